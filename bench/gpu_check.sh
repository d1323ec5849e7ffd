#!/usr/bin/env bash
# The GPU proof in one prepared run: bash bench/gpu_check.sh [--dry-run] [--budget SECONDS] OUT_DIR
# Run from the project root on a GPU machine (or anywhere with --dry-run: the same steps on the CPU, tiny sizes).
# What it runs and writes: bench/gpu_check.py. What a bare GPU machine lacks travels in the git-ignored .gpu/:
#   .gpu/wheels/   pure-Python wheels of jsonargparse and its signatures extras, made here with
#                  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels \
#                      jsonargparse==4.53.0 docstring-parser typeshed-client importlib-resources
#   .gpu/data/     cifar10-jpeg.tar.xz (cp ../shared/data/cifar10-jpeg.tar.xz .gpu/data/), for the real images
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    case " $* " in
        *" --dry-run "*) if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi ;;
        *) PYTHON=python3 ;;
    esac
fi
export PYTHON
exec "$PYTHON" bench/gpu_check.py "$@"
