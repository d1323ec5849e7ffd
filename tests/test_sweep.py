"""The sweep command end to end (handgrad.sweep.run): generated image folders, few epochs, CPU."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from handgrad.runtime import run_folders as outputs
from handgrad.sweep import run as sweep
from handgrad.sweep import cli as sweep_cli
from handgrad.sweep import report as report
from handgrad.sweep import select as selection
from handgrad.runtime.errors import ConfigError
from handgrad.sweep.module import GridClassifier
from handgrad.sweep.search import expand_grid, member_names

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "grid.yaml"
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")  # as tests/test_cli.py loads it
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
REFERENCE = [(0.01, 0.0, 0.0), (0.01, 0.0, 0.01), (0.01, 0.9, 0.0), (0.01, 0.9, 0.01), (0.01, 0.9, 0.001), (0.01, 0.8, 0.01)]


def sweep_args(root, *extra, epochs=2):
    """The reference config on the generated images, with a small network and batch for speed."""
    return ["--config", str(CONFIG), "--trainer.max_epochs", str(epochs), "--data.data_dir", str(root),
            "--data.download", "false", "--model.sizes", "[3072, 16, 2]", "--data.batch_size", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def selected_weights(log_dir) -> dict:
    """The state dict of the sweep's selected.ckpt (HandgradClassifier keys mlp.fc.<l>.weight / .bias)."""
    state = torch.load(Path(log_dir) / "selected.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("mlp.")}  # (not input_mean / input_std)


def scalars(run_dir: Path) -> dict:
    """Every scalar of a TensorBoard run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_grid_config_is_the_reference_grid():
    """configs/grid.yaml holds only what differs from the reference defaults (configs/default.yaml shows them); the
    sweep starts from them."""
    cfg = yaml.safe_load(CONFIG.read_text())
    members = [(m["lr"], m["momentum"], m["weight_decay"]) for m in cfg["model"]["members"]]
    assert members == REFERENCE
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    for section in ("trainer", "data"):
        assert not {k: v for k, v in cfg.get(section, {}).items() if default[section].get(k) == v}, section
    resolved = sweep_cli.SweepCLI(args=["--config", str(CONFIG)]).config  # what the sweep runs with
    assert resolved.trainer.max_epochs == 30 and resolved.data.batch_size == 256
    assert isinstance(resolved.model.init_seed, int) and list(resolved.data.classes) == ["airplane", "bird"]
    assert list(resolved.model.sizes) == [3072, 512, 128, 32, 2] and resolved.seed_everything == 265


def test_sweep_batched_equals_sequential_and_writes_results(image_folder, tmp_path, monkeypatch, capsys):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    args = sweep_args(root, "--trainer.precision", "64-true")
    batched = sweep.main(args)
    out = capsys.readouterr().out
    sequential = sweep.main(args + ["--sequential"])
    assert batched["mode"] == "batched" and sequential["mode"] == "sequential"
    assert batched["log_dir"] != sequential["log_dir"]

    # every epoch of every member: the batched grid == HandgradClassifier trained alone. The training
    # loss is summed in float64 from each step's loss; the module's own epoch metrics (val loss,
    # accuracies) are torchmetrics states, kept in float32 even under 64-true.
    for e, (b, s) in enumerate(zip(batched["history"]["train_loss"], sequential["history"]["train_loss"], strict=True)):
        assert b == pytest.approx(s, rel=1e-9), e
    for name in ("val_loss", "train_acc", "val_acc"):
        for b, s in zip(batched["history"][name], sequential["history"][name], strict=True):
            assert b == pytest.approx(s, rel=1e-6, abs=1e-6), name
    assert len(batched["history"]["train_loss"]) == 2

    for result in (batched, sequential):
        log_dir = Path(result["log_dir"])
        rows = read_csv(log_dir / "results.csv")
        assert list(rows[0]) == list(report.COLUMNS) and len(rows) == 6
        assert [(float(r["lr"]), float(r["momentum"]), float(r["weight_decay"])) for r in rows] == REFERENCE
        assert all(r["status"] == "ok" for r in rows)
        # the selection, recomputed from the file: highest val acc, then lowest val loss, then first
        key = [(-float(r["val_acc"]), float(r["val_loss"]), i) for i, r in enumerate(rows)]
        best = min(range(6), key=lambda i: key[i])
        assert [r["selected"] for r in rows] == ["True" if i == best else "False" for i in range(6)]
        assert result["best"] == best
        assert [r["test_acc"] != "" for r in rows] == [i == best for i in range(6)]  # only the selected one
        assert 0.0 <= float(rows[best]["test_acc"]) <= 1.0
        md = (log_dir / "results.md").read_text()
        assert md.count("\n") == 8 and "| yes |" in md
        assert all(line.split(" | ")[5] == "false" for line in md.splitlines()[2:])  # the nesterov column
        # one TensorBoard run per member, with epoch curves and its final metrics for the HPARAMS tab
        names = member_names(expand_grid(members=[{"lr": float(r["lr"]), "momentum": float(r["momentum"]),
                                                   "weight_decay": float(r["weight_decay"])} for r in rows]))
        for i, r in enumerate(rows):
            run = log_dir / names[i]
            assert (run / "hparams.yaml").exists()
            s = scalars(run)
            assert s["~hp/val_acc_last"][-1][1] == pytest.approx(float(r["val_acc"]), abs=1e-6)
            assert s["~hp/selected"][-1][1] == float(i == best)
            assert len(s["val/acc"]) == 2
    b_rows, s_rows = read_csv(Path(batched["log_dir"]) / "results.csv"), read_csv(Path(sequential["log_dir"]) / "results.csv")
    assert float(b_rows[batched["best"]]["test_acc"]) == pytest.approx(float(s_rows[sequential["best"]]["test_acc"]), abs=1e-6)
    assert "selected: member" in out and "| member | lr |" in out
    # the exported member: the batched grid's slice == the HandgradClassifier trained alone (float64 kept)
    assert batched["best"] == sequential["best"]
    b_w, s_w = selected_weights(batched["log_dir"]), selected_weights(sequential["log_dir"])
    assert sorted(b_w) == sorted(s_w) == ["mlp.fc.1.bias", "mlp.fc.1.weight", "mlp.fc.2.bias", "mlp.fc.2.weight"]
    for k in b_w:
        assert b_w[k].dtype == torch.float64
        torch.testing.assert_close(b_w[k], s_w[k], rtol=1e-9, atol=1e-12)
    assert f"selected checkpoint: {batched['log_dir'] / 'selected.ckpt'}" in out


def test_diverging_member_is_reported_failed_and_the_others_finish(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    members = '[{lr: 0.01}, {lr: 1000.0, momentum: 0.9}, {lr: 0.01, momentum: 0.9}]'
    statuses = []
    for extra in ([], ["--sequential"]):
        result = sweep.main(sweep_args(root, "--model.members", members, *extra, epochs=3))
        rows = read_csv(Path(result["log_dir"]) / "results.csv")
        statuses.append([r["status"] for r in rows])
        assert statuses[-1][0] == statuses[-1][2] == "ok" and statuses[-1][1].startswith("failed (epoch "), extra
        assert rows[1]["val_acc"] == "" and rows[1]["selected"] == "False"
        assert all(math.isfinite(float(rows[k][c])) for k in (0, 2) for c in ("train_loss", "val_acc"))
        assert len(result["history"]["train_loss"]) == 3 and result["best"] in (0, 2)
        assert statuses[-1][1] in (Path(result["log_dir"]) / "results.md").read_text()
    assert statuses[0] == statuses[1]  # batched and one-by-one agree on when it failed


def test_bad_grid_is_explained(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="exactly one"):
        sweep.main(sweep_args(root, "--model.grid", "{lr: [0.1]}"))
    with pytest.raises(ConfigError, match="momentun"):
        sweep.main(sweep_args(root, "--model.members", "[{lr: 0.1, momentun: 0.9}]"))
    assert not (tmp_path / "lightning_logs").exists()


BAD_OPTIONS = [  # (options, what the one-line error must say)
    (["--model.grid", "{lr: [0.01, 0.1]}"], "give exactly one of `grid` (lists, cartesian product) or `members`"),
    (["--model.members", "null", "--model.grid", "{lr: [-0.1]}"],
     "grid member 0: lr must be a finite number >= 0, got -0.1"),
    (["--model.members", "[{lr: 0.1, momentum: abc}]"], "members[0]: momentum must be a finite number >= 0, got 'abc'"),
    (["--model.members", "[]"], "`members` is empty: list at least one configuration"),
    (["--model.members", "null", "--model.grid", "{lr: [0.1], foo: [1]}"], "grid: unknown key(s) ['foo']"),
    (["--data.batch_size", "0"], "--data.batch_size must be >= 1"),
    (["--model.sizes", "[100, 2]"], "sizes[0] = 100 does not match the data: CIFAR10DataModule gives 3x32x32 = "
                                    "3072 values per image; set --model.sizes '[3072, 2]'"),
    (["--model.sizes", "[3072, 16, 3]"],
     "the data has 2 classes ['airplane', 'bird']; set --model.sizes '[3072, 16, 2]'"),
    (["--trainer.precision", "transformer-engine"], "--trainer.precision transformer-engine is not supported"),
    (["--sequential", "--model.init_seed", "null"], "--sequential needs --model.init_seed"),
    (["--sequential", "--select", "best_epoch"], "--sequential keeps only the last ones"),
    (["--model.members_per_step", "0"], "--model.members_per_step must be >= 1"),
    (["--model.members", "null", "--model.grid", "{lr: {uniform: [0.01, 0.1]}}"], "needs --model.samples N"),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"],
     "the sweep runs on one device or on Lightning's ddp strategy, not ddp_spawn"),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],  # called from Python
     "a sweep over several processes is started from the command line"),
]


def assert_one_line_error(capsys, call, message: str) -> None:
    """``call()`` exits with code 2 and stderr ends in one line ``error: ...`` containing ``message``, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and message in last, err


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_errors_and_nothing_is_written(options, message, image_folder, tmp_path,
                                                                  monkeypatch, capsys):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(capsys, lambda: train.main(["sweep", *sweep_args(root, *options)]), message)
    assert not (tmp_path / "lightning_logs").exists()  # no sweep/version_N, no config.yaml


def test_unwritable_log_folder_is_a_one_line_error(image_folder, tmp_path, monkeypatch, capsys):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder should go")
    args = sweep_args(root, "--trainer.logger.init_args.save_dir", "blocker/logs")
    assert_one_line_error(capsys, lambda: train.main(["sweep", *args]),
                          f"cannot write to blocker/logs/sweep (Not a directory: {blocker})")
    assert blocker.read_text() == "a file where the log folder should go"
    # a read-only folder (probed by creating a temporary file there; as root chmod would not refuse it)
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", refuse)
    assert_one_line_error(capsys, lambda: train.main(["sweep", *sweep_args(root)]),
                          f"cannot write to lightning_logs/sweep (Permission denied: "
                          f"{tmp_path})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "cifar"]


def test_results_table_shows_booleans_as_the_config_writes_them():
    members = [{"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "dampening": 0.0, "nesterov": True},
               {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.001, "dampening": 0.5, "nesterov": False}]
    history = {"train_loss": [[0.5, 0.25]], "train_acc": [[0.75, 0.5]], "val_loss": [[0.125, 2.0]],
               "val_acc": [[0.875, 0.5]]}
    rows = report.results_table(members, history, failed_epoch=[-1, -1], best=0, test={"test_acc": 0.8125})
    assert report.markdown(rows).splitlines()[2:] == [
        "| 0 | 0.01 | 0.9 | 0 | 0 | true |  | ok | 0.5000 | 0.7500 | 0.1250 | 0.8750 | 0.8750 | 0 | 0.8125 | yes |",
        "| 1 | 0.1 | 0 | 0.001 | 0.5 | false |  | ok | 0.2500 | 0.5000 | 2.0000 | 0.5000 | 0.5000 | 0 |  |  |",
    ]


def test_selected_checkpoint_is_tested_again_by_train_py(image_folder, tmp_path, monkeypatch, capsys):
    """selected.ckpt holds the selected member's weights as a HandgradClassifier; `train.py test` on it gives the
    sweep's test accuracy."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    result = sweep.main(sweep_args(root))
    out = capsys.readouterr().out
    log_dir, best = Path(result["log_dir"]), result["best"]
    ckpt = log_dir / "selected.ckpt"
    assert result["selected_ckpt"] == ckpt and f"selected checkpoint: {ckpt}" in out

    # the reference: member `best` of the grid's final weights, as the sweep saved its chunk of members
    [chunk] = (log_dir / "chunks").glob("chunk_*.pt")
    grid = GridClassifier(members=[{"lr": lr, "momentum": m, "weight_decay": wd} for lr, m, wd in REFERENCE],
                          sizes=[3072, 16, 2])
    grid.net.load_state_dict(torch.load(chunk, weights_only=True, map_location="cpu")["final"])
    reference = grid.net.member(best).state_dict()
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert sorted(saved["state_dict"]) == sorted([f"mlp.{k}" for k in reference] + ["input_mean", "input_std"])
    for k, v in reference.items():
        assert torch.equal(saved["state_dict"][f"mlp.{k}"], v), k
    lr, momentum, weight_decay = REFERENCE[best]
    assert {k: saved["hyper_parameters"][k] for k in ("sizes", "lr", "momentum", "weight_decay", "nesterov")} == {
        "sizes": [3072, 16, 2], "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": False}

    cli = train.main(["test", "--config", str(REPO / "configs" / "airplane_bird.yaml"), "--data.data_dir", str(root),
                      "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    assert list(cli.model.hparams.sizes) == [3072, 16, 2] and cli.model.hparams.momentum == momentum
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(result["rows"][best]["test_acc"], abs=1e-6)


@pytest.mark.skipif(not os.environ.get("HANDGRAD_SLOW"), reason="30 epochs x 6 members on real CIFAR-10 "
                    "(several minutes on a CPU); set HANDGRAD_SLOW=1 to run it")
def test_reference_grid_on_real_images(real_cifar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sweep.main(["--config", str(CONFIG), "--data.data_dir", str(real_cifar), "--data.download", "false",
                         "--trainer.enable_progress_bar", "false"])
    best = result["rows"][result["best"]]
    assert best["val_acc"] >= 0.84 and best["test_acc"] >= 0.845


def test_validation_every_second_epoch_keeps_its_curves_and_histories_agree(image_folder, tmp_path, monkeypatch):
    """Issue 11, bug 2: with validation every 2nd epoch the member runs keep their val curves (at the steps where
    validation ran), and the batched and --sequential histories hold the same rows (no stale val rows)."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    members = '[{lr: 0.01}, {lr: 0.02, momentum: 0.9}]'
    args = sweep_args(root, "--model.members", members, "--trainer.check_val_every_n_epoch", "2",
                      "--trainer.precision", "64-true", epochs=3)
    results = [sweep.main(args), sweep.main(args + ["--sequential"])]
    for result in results:
        assert [len(result["history"][name]) for name in ("train_loss", "train_acc", "val_loss", "val_acc")] == \
            [3, 3, 1, 1]
        for k, name in enumerate(member_names(expand_grid(members=yaml.safe_load(members)))):
            s = scalars(Path(result["log_dir"]) / name)
            # after epoch 2 of 4 steps each, at Lightning's step of epoch metrics (the epoch's last: global step - 1)
            assert [step for step, _ in s["val/acc"]] == [7]
            assert [step for step, _ in s["train/loss"]] == [3, 7, 11]
            assert s["val/acc"][0][1] == pytest.approx(result["history"]["val_acc"][0][k], abs=1e-6)
    batched, sequential = results
    for name in ("train_loss", "val_loss", "val_acc"):
        for b, q in zip(batched["history"][name], sequential["history"][name], strict=True):
            assert b == pytest.approx(q, rel=1e-6, abs=1e-6), name


def test_selection_rules_and_seed_means():
    """--select last|best_epoch on hand-made histories; with repeated seeds a configuration wins by its mean."""
    members = expand_grid(members=[{"lr": 0.01}, {"lr": 0.1}], seeds=[1, 2])  # A1 A2 B1 B2
    history = {"train_loss": [[0.5] * 4] * 2, "train_acc": [[0.5] * 4] * 2,
               "val_acc": [[0.95, 0.9, 0.7, 0.8], [0.6, 0.5, 0.8, 0.7]], "val_loss": [[0.3, 0.3, 0.2, 0.1]] * 2}
    steps = {"train_step": [4, 8], "val_epoch": [0, 1], "val_step": [4, 8]}
    rows = report.results_table(members, history, [-1] * 4, None, {}, steps)
    assert [r["best_val_acc"] for r in rows] == [0.95, 0.9, 0.8, 0.8] and [r["best_epoch"] for r in rows] == [0, 0, 1, 0]
    # last: A's mean 0.55 < B's 0.75, then B's better seed; best_epoch: A's mean 0.925 > B's 0.8, then A's better seed
    assert selection.select(rows, "last") == 2 and selection.select(rows, "best_epoch") == 0
    rows[2]["selected"], rows[2]["test_acc"] = True, 0.75
    by = report.by_config(rows)
    assert [r["seeds"] for r in by] == ["1 2", "1 2"] and [r["selected"] for r in by] == [False, True]
    assert by[0]["val_acc_mean"] == pytest.approx(0.55) and by[0]["val_acc_std"] == pytest.approx(0.1 / math.sqrt(2))
    assert by[1]["best_val_acc_mean"] == pytest.approx(0.8) and by[1]["best_val_acc_std"] == 0
    md = report.markdown(by, report.CONFIG_COLUMNS).splitlines()
    assert md[3].startswith("| 1 | 0.1 | 0 | 0 | 0 | false | 1 2 | ok | 0.5000 ± 0.0000 |") and "| 0.7500 | yes |" in md[3]
    one_seed = expand_grid(members=[{"lr": 0.01}, {"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}])  # members compete alone
    rows = report.results_table(one_seed, history, [-1] * 4, None, {}, steps)
    assert selection.select(rows, "last") == 2 and selection.select(rows, "best_epoch") == 0


def test_seeds_and_best_epoch_selection_end_to_end(image_folder, tmp_path, monkeypatch, capsys):
    """Repeated seeds give mean ± std columns; --select best_epoch saves the selected member's best-epoch weights,
    which `train.py validate|test --ckpt_path selected.ckpt` evaluate to the table's numbers; the sweep logs under
    --trainer.default_root_dir."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    result = sweep.main(sweep_args(root, "--model.members", "[{lr: 0.05}, {lr: 0.5, momentum: 0.9}]",
                                   "--model.seeds", "[1, 2]", "--select", "best_epoch",
                                   "--trainer.default_root_dir", "out", epochs=3))
    log_dir, best, rows = Path(result["log_dir"]), result["best"], result["rows"]
    assert log_dir == Path("out/lightning_logs/sweep/version_0") and not (tmp_path / "lightning_logs").exists()
    by = read_csv(log_dir / "results_by_config.csv")
    assert [r["seeds"] for r in by] == ["1 2", "1 2"] and "val_acc_mean" in by[0] and "val_acc_std" in by[0]
    for c, r in enumerate(by):
        values = [rows[k]["best_val_acc"] for k in (2 * c, 2 * c + 1)]
        assert float(r["best_val_acc_mean"]) == pytest.approx(sum(values) / 2)
        assert float(r["best_val_acc_std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert " ± " in (log_dir / "results_by_config.md").read_text()
    assert all(r["best_val_acc"] >= r["val_acc"] for r in rows)
    assert rows[best]["best_epoch"] < 2 and rows[best]["best_val_acc"] > rows[best]["val_acc"]  # not the last weights
    # selected.ckpt: the best-epoch weights of the selected member, as the chunk saved them
    [chunk] = (log_dir / "chunks").glob("chunk_*.pt")
    saved = torch.load(chunk, weights_only=True, map_location="cpu")["best"]
    ckpt = torch.load(log_dir / "selected.ckpt", weights_only=True, map_location="cpu")
    for name, w in saved.items():
        assert torch.equal(ckpt["state_dict"][f"mlp.{name}"], w[best]), name
    assert ckpt["epoch"] == rows[best]["best_epoch"] and ckpt["handgrad_sweep"]["select"] == "best_epoch"
    for command, metric, expected in (("validate", "val/acc", rows[best]["best_val_acc"]),
                                      ("test", "test/acc", rows[best]["test_acc"])):
        cli = train.main([command, "--config", str(REPO / "configs" / "airplane_bird.yaml"), "--data.data_dir",
                          str(root), "--ckpt_path", str(log_dir / "selected.ckpt"), "--trainer.enable_progress_bar",
                          "false", "--trainer.default_root_dir", "out"])
        assert float(cli.trainer.callback_metrics[metric]) == pytest.approx(expected, abs=1e-6), command


def test_default_members_per_step(monkeypatch):
    """Unset, K is 16 on a CPU; on a GPU half the free memory over one member's share (its parameters in weights,
    gradients, momentum, the SGD step's two work tensors and, with best_epoch, the best copy; its activations for
    one batch)."""
    from handgrad.sweep.ranks import default_members_per_step

    sizes = [3072, 512, 128, 32, 2]
    assert default_members_per_step(torch.device("cpu"), sizes, 256, torch.float32, keep_best=False) == 16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 140 * 2**30))
    params = 3072 * 512 + 512 + 512 * 128 + 128 + 128 * 32 + 32 + 32 * 2 + 2
    for keep_best, copies in ((False, 5), (True, 6)):
        per_member = 4 * (copies * params + 3 * 256 * (512 + 128 + 32 + 2))
        assert default_members_per_step(torch.device("cuda", 0), sizes, 256, torch.float32, keep_best) == \
            40 * 2**30 // per_member
    assert default_members_per_step(torch.device("cuda", 0), sizes, 256, torch.float64, False) == \
        40 * 2**30 // (8 * (5 * params + 3 * 256 * 674))
