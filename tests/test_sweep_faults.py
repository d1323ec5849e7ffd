"""A sweep's folder damaged between two runs (a truncated, empty or random plan.json; a damaged chunk's record or
weights), then the same sweep run again into it: a damaged plan is refused with one error line, a damaged chunk is
trained again with a one-line notice naming it, and the results table equals the undamaged run's, number for number
(float64 on the CPU: a chunk trained again gives the same bits). No number reaches the table that an intact file does
not back."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def args(root, *extra) -> list[str]:
    """The reference grid (6 members) in chunks of 2 (3 chunks), float64, small network, into version_0."""
    return ["sweep", "--config", str(REPO / "configs" / "grid.yaml"), "--trainer.max_epochs", "2",
            "--data.data_dir", str(root), "--data.download", "false", "--model.sizes", "[3072, 8, 2]",
            "--data.batch_size", "16", "--model.members_per_step", "2", "--trainer.precision", "64-true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.version", "0", *extra]


def table(log_dir: Path) -> list[dict]:
    with open(log_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One undamaged sweep: its data, its folder's files as bytes, and its results table."""
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("sweep_faults")
    root = base / "data"
    write_image_folder(root, per_class_train=20, per_class_test=6, classes=("airplane", "bird"))
    work = base / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        train.main(args(root))
    finally:
        os.chdir(cwd)
    log_dir = work / "lightning_logs" / "sweep" / "version_0"
    files = {p.relative_to(log_dir): p.read_bytes() for p in (log_dir / "chunks").iterdir()}
    return root, files, table(log_dir)


def fresh_copy(reference, tmp_path) -> Path:
    """The reference sweep's chunks in a new working folder, as a sweep interrupted after its last chunk."""
    _, files, _ = reference
    log_dir = tmp_path / "lightning_logs" / "sweep" / "version_0"
    for name, data in files.items():
        (log_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (log_dir / name).write_bytes(data)
    return log_dir


@pytest.mark.parametrize("damage", [b"", b'{"fingerprint": "ab', os.urandom(64)], ids=["empty", "truncated", "random"])
def test_a_damaged_plan_is_one_error_line_and_nothing_is_written(reference, tmp_path, monkeypatch, capsys, damage):
    root = reference[0]
    log_dir = fresh_copy(reference, tmp_path)
    (log_dir / "chunks" / "plan.json").write_bytes(damage)
    before = {p: p.read_bytes() for p in log_dir.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(root))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {log_dir.relative_to(tmp_path) / 'chunks' / 'plan.json'} is damaged (not the plan a "
                      f"sweep writes): move {log_dir.relative_to(tmp_path) / 'chunks'} away to train every member "
                      f"again, or write into a new folder (leave out --trainer.logger.init_args.version)"], err
    assert {p: p.read_bytes() for p in log_dir.rglob("*") if p.is_file()} == before


DAMAGES = {
    "record truncated": ("chunk_0001.json", lambda b: b[: len(b) // 2], "its record is not a chunk's"),
    "record random": ("chunk_0002.json", lambda b: os.urandom(len(b)), "its record is not a chunk's"),
    "weights truncated": ("chunk_0001.pt", lambda b: b[: len(b) // 3], "its weights do not have the recorded checksum"),
    "weights flipped": ("chunk_0000.pt", lambda b: b[:-100] + bytes(x ^ 1 for x in b[-100:]),
                        "its weights do not have the recorded checksum"),
    "weights missing": ("chunk_0002.pt", None, "its weights are missing"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_chunk_is_trained_again_and_the_table_is_the_same(reference, tmp_path, monkeypatch, capsys, name):
    root, files, expected = reference
    log_dir = fresh_copy(reference, tmp_path)
    file, damage, why = DAMAGES[name]
    path = log_dir / "chunks" / file
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    monkeypatch.chdir(tmp_path)
    train.main(args(root))
    out = capsys.readouterr().out
    chunk = int(file[6:10])
    notice = [line for line in out.splitlines() if line.startswith("notice:")]
    assert notice == [f"notice: {(log_dir / 'chunks' / f'chunk_{chunk:04d}.json').relative_to(tmp_path)} is damaged "
                      f"({why}); training chunk {chunk} again"], out
    assert "resuming the sweep" in out and "2 of 3 chunks are done" in out
    assert table(log_dir) == expected  # the same numbers, from the chunk trained again
    for other in files:  # every chunk file as the undamaged run wrote it: the damaged chunk trained to the same bits
        assert (log_dir / other).read_bytes() == files[other], other
