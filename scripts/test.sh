#!/usr/bin/env bash
# bash scripts/test.sh — the README's test command and what CI (.ci/run) runs: set up .venv (if needed), build
# the Rust extension, lint (cargo fmt, clippy, ruff), cargo test, build + install-check the wheel, then pytest
# (which also compiles every CUDA source with nvcc from PyPI: no GPU needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# SMDM_VENV=DIR: use / create that venv instead of .venv; SMDM_TORCH=2.11.0: install that torch first (the GPU
# machines run torch 2.11 with CUDA 13.0: `SMDM_VENV=/tmp/v211 SMDM_TORCH=2.11.0 bash scripts/test.sh` runs the
# whole suite, nvcc 13.0 build of the kernels included, against it)
PY=${PYTHON:-python3}
VENV=${SMDM_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
[ -z "${SMDM_TORCH:-}" ] || python -m pip install -q "torch==$SMDM_TORCH"
python -m pip install -q -e '.[test]'
# the real litgpt model code that tests/test_convert.py checks the converter against: litgpt's pins (a lightning
# nightly for 0.2.0; psutil / jsonargparse / huggingface-hub < 1.4 for 0.5.13) do not resolve beside torch and
# lm-eval, so each version goes without its dependencies into its own dir (~0.35 MB of wheels); lightning and
# psutil, which its model imports, come with the test extra. SMDM_REQUIRE_LITGPT: a missing litgpt fails those tests
if python -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    for v in 0.2.0 0.5.13; do
        [ -f ".litgpt/$v/litgpt/__init__.py" ] || python -m pip install -q --no-deps --target ".litgpt/$v" "litgpt==$v"
    done
    export SMDM_REQUIRE_LITGPT=1
fi
# nvcc for the CUDA compile check, pinned to the CUDA runtime that torch brought (a newer nvcc rejects torch's
# headers). ~275 MB, cached by pip after the first run.
# torch < 2.9 (the last for Python 3.9) brings CUDA 12 wheels, whose nvidia-cuda-nvcc-cu12 holds ptxas but no
# nvcc: there the compile check is skipped (with a note from the tests), as on any machine without nvcc.
CUDA_V=$(python -c "import importlib.metadata as m
try: print('.'.join(m.version('nvidia-cuda-runtime').split('.')[:2]))
except m.PackageNotFoundError: pass")
if [ -n "$CUDA_V" ]; then
    python -m pip install -q "nvidia-cuda-nvcc==$CUDA_V.*" "nvidia-cuda-crt==$CUDA_V.*" "nvidia-nvvm==$CUDA_V.*" \
        nvidia-cuda-cccl pybind11 ninja
    export SMDM_REQUIRE_NVCC=1
else
    echo "scripts/test.sh: note: torch $(python -c 'import torch; print(torch.__version__)') has no CUDA 13" \
        "runtime wheel, so no nvcc from PyPI: the CUDA compile check is skipped" >&2
    python -m pip install -q pybind11 ninja
fi
cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings
cargo test -q
bash scripts/check_wheel.sh
ruff check python tests benches
# Two pytest workers (pytest-xdist; SMDM_TEST_WORKERS=0 runs in one process): many long tests keep one core busy
# at a time (an nvcc unit, torchrun and CLI start-up, imports), so two workers shorten the suite on this project's
# 2-core CI machine (720 tests: 452 s in one process, 396 s with two while another job shared the machine;
# .ci/run's pytest then took 310-323 s with two for 742 tests).
python -m pytest -q -n "${SMDM_TEST_WORKERS:-2}" --dist worksteal "$@"
