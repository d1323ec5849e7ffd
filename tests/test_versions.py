"""The installed releases work where the README sends users. CI runs the suite on the newest releases pyproject.toml
allows and again on the lowest (constraints-lowest.txt)."""

import subprocess
import sys

import tensorboard


def test_the_tensorboard_viewer_starts():
    """`tensorboard --logdir lightning_logs` (README). tensorboard < 2.21 imports pkg_resources there, which
    setuptools >= 82 no longer has: with those, writing event files works but the viewer does not start."""
    run = subprocess.run([sys.executable, "-m", "tensorboard.main", "--version_tb"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == tensorboard.__version__, run.stderr
