"""Every command the README and docs/ show works as written: each `python train.py ...` (in a code block or inline)
parses with this version's options (LightningCLI's --print_config, placeholders filled in), each bench command with
its script's parser, and every kind of command is run for real by a test named here (that test must exist)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from handgrad import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = {"$NODE_RANK": "0", "$MASTER_ADDR": "127.0.0.1", "COMMAND": "fit"}
# what runs each kind of command for real (the commands here only parse: they would train for minutes)
RUN_BY = {
    "main job": "test_cli.py::test_default_job_fits_tests_and_prints_a_summary",
    "fit": "test_cli.py::test_fit_validate_test_predict",
    "validate": "test_cli.py::test_fit_validate_test_predict",
    "test": "test_standalone.py::test_test_with_the_checkpoint_and_only_the_data_dir_gives_the_runs_accuracy",
    "predict": "test_standalone.py::test_predict_own_images_without_cifar_data",
    "sweep": "test_sweep.py::test_sweep_batched_equals_sequential_and_writes_results",
    "verify": "test_verify.py::test_reference_model_passes_and_writes_table_json_and_tensorboard",
    "torchrun": "test_sweep_distributed.py::test_two_processes_give_the_one_process_results",
    "srun": "test_distributed.py::test_two_processes_train_like_one",
    "tensorboard": "test_versions.py::test_the_tensorboard_viewer_starts",
    "bench": "test_bench.py::test_every_part_trains_the_same_members",
    "gpu_check": "test_gpu_check.py::test_the_dry_run_passes_every_step",
    "install": "test_cli.py::test_an_installed_handgrad_runs_the_reference_defaults_from_any_folder",
}


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every shell command in a bash block (continuations joined, && chains split, comments
    dropped) and of every inline `python train.py ...` / `python -m handgrad ...`."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            for line in block.group(1).replace("\\\n", " ").splitlines():
                found += [(f"{path.name}: {line.strip()[:90]}", argv)
                          for argv in split_chain(shlex.split(line, comments=True))]
        for inline in re.findall(r"`((?:python3?|\.venv/bin/python) (?:train\.py|-m handgrad)\b[^`]*)`", text):
            if "..." not in inline:
                found.append((f"{path.name}: `{inline}`", shlex.split(inline)))
    return found


def split_chain(argv: list[str]) -> list[list[str]]:
    chain, current = [], []
    for word in argv:
        if word == "&&":
            chain.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in chain + [current] if c]


def kind_and_args(argv: list[str]) -> tuple[str, list[str]]:
    """The kind of a command (a RUN_BY key) and, for train.py, its arguments with placeholders filled in."""
    argv = [PLACEHOLDERS.get(w, w) for w in argv]
    program = Path(argv[0]).name
    if program in ("torchrun", "srun"):
        start = next(i for i, w in enumerate(argv) if w == "train.py" or w.endswith("python"))
        args = argv[start + (1 if argv[start] == "train.py" else 2):]
        return program, optional_brackets(args)
    if program.startswith("python") and argv[1:2] == ["train.py"] or argv[1:3] == ["-m", "handgrad"]:
        args = optional_brackets(argv[2:] if argv[1] == "train.py" else argv[3:])
        return (args[0] if args and not args[0].startswith("-") else "main job"), args
    if program.startswith("python") and argv[1:3] == ["-m", "pytest"]:
        return "pytest", []
    if program.startswith("python") and argv[1:2] == ["-m"] and argv[2] == "venv" or program == "pip":
        return "install", []
    if program.startswith("python") and argv[1].startswith("bench/"):
        return "bench", argv[1:]
    if program == "bash" and argv[1] == "bench/gpu_check.sh":
        return "gpu_check", argv[2:]
    return program, argv[1:]


def optional_brackets(args: list[str]) -> list[str]:
    """`[--trainer.accelerator cpu]` (an optional part) as given."""
    out = []
    for w in args:
        out.append(w[1:] if w.startswith("[--") else w[:-1] if w.endswith("]") and out and out[-1].startswith("--")
                   and not w.startswith("[") else w)
    return out


COMMANDS = shown_commands()


def test_the_docs_show_commands_and_each_kind_is_run_by_a_test():
    kinds = {kind_and_args(argv)[0] for _, argv in COMMANDS}
    assert {"main job", "fit", "sweep", "verify", "tensorboard", "install", "pytest"} <= kinds  # it found them
    unknown = sorted(kinds - set(RUN_BY) - {"pytest", "help"})
    assert not unknown, f"commands shown in the docs that no test runs: {unknown}; add them to RUN_BY"
    for kind in kinds & set(RUN_BY):
        file, name = RUN_BY[kind].split("::")
        assert re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), re.M), f"{kind}: {RUN_BY[kind]}"


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if kind_and_args(c[1])[0] in
                                         ("main job", "fit", "validate", "test", "predict", "sweep", "verify",
                                          "torchrun", "srun")], ids=lambda v: v if isinstance(v, str) else "")
def test_a_train_py_command_of_the_docs_parses(where, argv, monkeypatch):
    """Its options exist and take the values shown (LightningCLI stops after --print_config, before any run)."""
    monkeypatch.chdir(REPO)
    _, args = kind_and_args(argv)
    helps = "--help" in args
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        cli.main(args if helps else [*args, "--print_config"])
    assert done.value.code == 0, f"{where}\n{err.getvalue()[-2000:]}"
    assert ("--trainer" if helps else "trainer:") in out.getvalue()


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def test_the_bench_commands_of_the_docs_parse(monkeypatch):
    shown = [kind_and_args(argv)[1] for _, argv in COMMANDS if kind_and_args(argv)[0] == "bench"]
    assert shown, "the docs show no bench command"
    bench = bench_module("bench")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)  # the docs' GPU line, parsed here
    for args in shown:
        assert args[0] == "bench/bench.py", args
        bench.parse_args(args[1:])  # exits with argparse's error on an option that does not exist


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert len(first_block) == 2 and first_block[0].endswith("&& .venv/bin/python train.py")
    assert first_block[1] in (REPO / ".ci" / "run").read_text().splitlines()
    assert first_block[1].endswith(".venv/bin/python -m pytest -q")
