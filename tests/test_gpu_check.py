"""bench/gpu_check.sh --dry-run: the GPU proof's every step on the CPU with tiny sizes, so that the prepared script
cannot rot between the rare runs on a GPU (its CUDA-only parts skipped, each by name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert report["dry_run"] and list(steps) == ["wheels", "environment", "cuda tests", "bench", "sweep", "main job",
                                                 "verify"]
    assert all(s["status"] == "pass" for s in steps.values()), steps
    assert steps["cuda tests"]["figures"]["skipped"] >= 10 and "passed" not in steps["cuda tests"]["figures"]
    sweep = steps["sweep"]["figures"]
    assert sweep["cuda_graph"] == "skipped (needs CUDA)" and sweep["inductor"]["selected"] == sweep["none"]["selected"]
    assert {r["part"] for r in steps["bench"]["figures"]["summary"]} >= {"plain", "trainer", "grid[none]",
                                                                          "grid[none]@bf16-mixed", "gemm"}
    assert all("29 checks, 0 failed" in v["checks"] or "33 checks, 0 failed" in v["checks"]
               for v in steps["verify"]["figures"].values())
    assert "| cuda tests | pass |" in (out / "gpu_check.md").read_text()
