"""`python train.py verify` on small generated images, and its checks on known answers: right code passes, and a
wrong derivative, a forgotten bias gradient and an SGD that ignores dampening fail where they are wrong (the
deliberately wrong code is in tests/course_models.py); bad options are one `error:` line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.core.mlp import MLP
from handgrad.core.optim import SGD
from handgrad.verify.checks import check_autograd, check_finite_differences, check_sgd, course_subject, ulp_distance
from test_distributed import two_processes  # (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
COURSE = Path(__file__).with_name("course_models.py")
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
_spec = importlib.util.spec_from_file_location("course_models", COURSE)
course_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(course_models)


@pytest.fixture
def args(image_folder, tmp_path, monkeypatch):
    """verify on 32 generated airplane/bird images (one batch), MLP 3072-8-2; logs land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return ["verify", "--data.data_dir", str(image_folder[0]), "--model.sizes", "[3072, 8, 2]",
            "--trainer.accelerator", "cpu"]


def test_reference_model_passes_and_writes_table_json_and_tensorboard(args, tmp_path, capsys):
    report = train.main([*args, "--verify.steps", "2"])
    out = capsys.readouterr().out
    rows = report["rows"]
    assert report["passed"] and report["first_failure"] is None
    assert Counter(r["check"] for r in rows) == {
        "autograd float64": 4, "autograd float32": 4, "finite differences": 4, "sgd 1 step single-tensor": 4,
        "sgd 5 steps single-tensor": 4, "sgd 1 step foreach": 4, "sgd 5 steps foreach": 4, "training float64": 2,
        "data parallel": 1}
    value = {(r["check"], r["layer"], r["param"]): r["value"] for r in rows}
    assert [(r["layer"], r["param"]) for r in rows[:4]] == [(2, "dL_dw"), (2, "dL_db"), (1, "dL_dw"), (1, "dL_db")]
    assert all(value[("autograd float64", l, p)] < 1e-13 for l in (1, 2) for p in ("dL_dw", "dL_db"))
    assert all(0 < value[("finite differences", l, "dL_dw")] < 1e-7 for l in (1, 2))  # a real difference, small
    assert all(r["value"] == 0 and r["detail"] == "bitwise equal" for r in rows if r["check"].startswith("sgd"))
    assert rows[-1]["verdict"] == "skipped" and rows[-1]["detail"].startswith("one process")

    torch.manual_seed(265)  # --verify.seed: the model's initial weights
    assert_worst_is_autograds(rows, args[2], MLP([3072, 8, 2]))

    run = tmp_path / "lightning_logs" / "version_0"
    assert json.loads((run / "verify.json").read_text())["rows"] == rows
    assert (run / "config.yaml").is_file()
    assert re.search(r"^autograd float64 +2 +dL_dw +\S+ +1e-10 +pass +worst \[", out, re.M)
    assert re.search(r"^sgd 5 steps foreach +1 +b +0 +0 +pass +bitwise equal$", out, re.M)
    assert f"{len(rows)} checks, 0 failed" in out
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("verify/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "all checks pass" in text and "| finite differences | 1 | dL_db |" in text


def assert_worst_is_autograds(rows, data_dir, model):
    """The worst element the report names for W^1 (float64) is autograd's gradient of the same loss, at the same
    weights, on the same batch."""
    data = CIFAR10DataModule(data_dir)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    model = model.double()
    grad_w1 = torch.autograd.grad(F.cross_entropy(model(x.double()), y), model.fc["1"].weight)[0]
    worst = next(r["detail"] for r in rows if r["check"] == "autograd float64" and r["layer"] == 1)
    index = [int(i) for i in worst.split("[")[1].split("]")[0].split(",")]
    assert f"vs {grad_w1[tuple(index)]:.6e}" in worst


@pytest.mark.parametrize("precision, rows", [("bf16-mixed", {"autograd float32": 4, "autograd bf16-mixed": 4}),
                                             ("bf16-true", {"autograd bfloat16": 4}),
                                             ("16-true", {"autograd float16": 4})])
def test_verify_in_each_precision(args, capsys, precision, rows):
    """Under mixed precision the hand-written bfloat16 products against autograd under torch.autocast (within
    2u (L - l + 2), tests/test_precision.py), the SGD step bitwise on the same float32 gradients; in a true half
    precision, autograd in that dtype and the SGD step bitwise in it."""
    report = train.main([*args, "--trainer.precision", precision])
    assert report["passed"] and report["precision"] == precision
    counts = Counter(r["check"] for r in report["rows"])
    assert all(counts[name] == n for name, n in rows.items()), counts
    judged = [r for r in report["rows"] if r["check"] in rows and "float32" not in r["check"]]
    assert {(r["layer"], r["tol"]) for r in judged} == {(2, 2 * 2.0 ** (-11 if precision == "16-true" else -8) * 2),
                                                        (1, 2 * 2.0 ** (-11 if precision == "16-true" else -8) * 3)}
    assert all(r["value"] == 0 and r["detail"] == "bitwise equal" for r in report["rows"]
               if r["check"].startswith("sgd"))


def test_a_config_saved_by_fit_and_a_checkpoint_s_weights(args, tmp_path):
    torch.manual_seed(1)
    trained = MLP([3072, 8, 2])
    torch.save({"state_dict": {f"mlp.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.ckpt")
    (tmp_path / "fit.yaml").write_text("checkpoint:\n  monitor: val/acc\nlast_checkpoint:\n  filename: last\n"
                                       "ckpt_path: null\nweights_only: null\n")
    report = train.main([*args, "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(tmp_path / "w.ckpt")])
    assert report["passed"] and report["subject"].endswith(f"weights of {tmp_path / 'w.ckpt'}")
    assert_worst_is_autograds(report["rows"], args[2], trained)



def test_default_root_dir_holds_the_run_folder(args, tmp_path, capsys):
    """As for fit (tests/test_cli.py): the run folder (verify.json, config.yaml, TensorBoard) is under
    --trainer.default_root_dir, not the working directory."""
    root = tmp_path / "runs"
    report = train.main([*args, "--trainer.default_root_dir", str(root), "--verify.sgd_steps", "1",
                         "--verify.fd_samples", "1"])
    run = root / "lightning_logs" / "version_0"
    assert json.loads((run / "verify.json").read_text())["rows"] == report["rows"]
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert f"report: {run / 'verify.json'}" in capsys.readouterr().out
    assert not (tmp_path / "lightning_logs").exists()

@pytest.mark.parametrize("extra, message", [
    ([f"--verify.model={COURSE}:CourseNet", "--verify.sizes=[3072, 8, 4, 2]"], None),
    ([f"--verify.model={COURSE}:WrongTanhNet", "--verify.sizes=[3072, 8, 4, 2]"], "layer 2 dL_dw"),
    ([f"--verify.model={COURSE}:CourseNet", f"--verify.backprop={COURSE}:backprop_without_bias"], "layer 2 dL_db"),
    ([f"--verify.optimizer={COURSE}:MomentumWithoutDampening", "--model.dampening=0.5"], "layer 2 W"),
])
def test_course_models_and_sgds_fail_where_they_are_wrong(args, tmp_path, capsys, extra, message):
    if message is None:
        assert train.main([*args, *extra])["passed"]
        return
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, *extra])
    assert exit_info.value.code == 1
    assert f"verify: FAILED at {message} (" in capsys.readouterr().err
    rows = json.loads((tmp_path / "lightning_logs" / "version_0" / "verify.json").read_text())["rows"]
    verdict = {(r["check"], r["layer"], r["param"]): r["verdict"] for r in rows}
    if "WrongTanhNet" in extra[0]:  # layer 3 does not use df[2]; layers 2 and 1 do
        for check in ("autograd float64", "finite differences"):
            assert [verdict[(check, l, "dL_dw")] for l in (3, 2, 1)] == ["pass", "FAIL", "FAIL"]


def test_sgd_that_ignores_dampening_is_not_bitwise_equal():
    torch.manual_seed(0)
    model = MLP([6, 5, 3])
    grads = [{(l, n): torch.randn_like(p) for l, n, p in
              [(l, n, getattr(model.fc[str(l)], a)) for l in (2, 1) for n, a in (("dL_dw", "weight"), ("dL_db", "bias"))]}
             for _ in range(4)]
    hp = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01, nesterov=False)
    rows = check_sgd(course_models.MomentumWithoutDampening, hp, model, grads)
    first = [r for r in rows if r.check.startswith("sgd 1 step")]
    later = [r for r in rows if r.check.startswith("sgd 4 steps")]
    assert len(first) == len(later) == 8
    assert all(r.verdict == "pass" for r in first)  # the first step sets b = g on both sides: equal
    assert all(r.verdict == "FAIL" and r.value > 1000 and "ulp" in r.detail for r in later)
    assert all(r.verdict == "pass" for r in check_sgd(SGD, hp, model, grads))
    assert all(r.verdict == "pass" for r in check_sgd(course_models.MomentumWithoutDampening,
                                                      dict(hp, dampening=0.0), model, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ulp_distance_counts_the_floats_in_between(dtype):
    x = torch.tensor([1.0, -3.5, 1e-30, -7e5, 0.0], dtype=dtype)
    y = x.clone()
    for k in range(1, 4):
        y = torch.nextafter(y, torch.full_like(y, float("inf")))
        assert ulp_distance(x, y).tolist() == [k] * 5
    tiny = torch.nextafter(torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype))
    assert ulp_distance(-tiny, tiny).item() == 2  # -tiny, 0, +tiny
    assert ulp_distance(torch.tensor([-0.0], dtype=dtype), torch.tensor([0.0], dtype=dtype)).item() == 0


def test_course_net_passes_checks_and_wrong_derivative_does_not():
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    from handgrad.core.backprop import backpropagation

    for cls, ok in ((course_models.CourseNet, True), (course_models.WrongTanhNet, False)):
        torch.manual_seed(0)
        subject = course_subject(cls([7, 4, 4, 3]), backpropagation, cls.__name__)
        rows = check_autograd(subject, x, y, torch.float64, 1e-10)
        rows += check_finite_differences(subject, x, y, samples=6, eps=1e-6, tol=1e-6, seed=0)
        assert all(r.verdict == "pass" for r in rows) == ok
        assert all(r.verdict == "pass" for r in rows if r.layer == 3)


@pytest.mark.parametrize("extra, message", [
    (["--verify.model", "no_such_package.net:Net"], "--verify.model no_such_package.net:Net: cannot import it"),
    (["--verify.model", f"{COURSE}:Nope"], "cannot import it (AttributeError"),
    (["--verify.model", f"{COURSE}:NoGradNet"], "has no dL_dw, dL_db"),
    (["--verify.optimizer", "torch.optim:NoSuchSGD"], "--verify.optimizer torch.optim:NoSuchSGD: cannot import"),
    (["--verify.fd_samples", "0"], "--verify.fd_samples must be an integer >= 1"),
    (["--verify.sizes", "[3072, 8, 3]"], "the model has 3 outputs"),
    (["--ckpt_path", str(COURSE)], "is not a handgrad checkpoint"),
])
def test_bad_input_is_one_error_line(args, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "lightning_logs").exists()


def test_data_parallel_all_reduced_gradient_equals_the_global_batch_gradient(image_folder, tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), "verify", "--data.data_dir", str(image_folder[0]),
           "--model.sizes", "[3072, 8, 2]", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--verify.sgd_steps", "1", "--verify.fd_samples", "1"]
    two_processes(cmd, tmp_path)  # (it fails on a timeout or a nonzero exit code, with the output)
    rows = json.loads((tmp_path / "lightning_logs" / "version_0" / "verify.json").read_text())["rows"]
    parallel = [r for r in rows if r["check"].startswith("data parallel")]
    assert [r["check"] for r in parallel] == ["data parallel float64"] * 4 + ["data parallel float32"] * 4
    assert all(r["verdict"] == "pass" and "2 processes, global batch 32" in r["detail"] for r in parallel)
    assert all(r["value"] < 1e-14 for r in parallel[:4])
