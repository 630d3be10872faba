#!/usr/bin/env bash
# bash scripts/check_wheel.sh — `maturin build --release` a wheel, install it into a fresh virtual environment
# and import it there (the extension, the exceptions and one Rust call). Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
maturin build --release --quiet --out "$work/dist" >/dev/null
wheel=$(ls "$work"/dist/smdm-*.whl)
echo "built $(basename "$wheel")"
case "$wheel" in *abi3*) ;; *) echo "!! wheel is not abi3: $wheel"; exit 1 ;; esac
python -m venv "$work/venv"
# numpy only: the extension takes numpy buffers; torch & co. are not needed to import smdm._core
"$work/venv/bin/pip" install -q numpy "$wheel" --no-deps
(cd "$work" && "$work/venv/bin/python" - <<'PY'
import numpy as np
import smdm, smdm._core as core
from smdm import rng
assert core.rng_key([1, 2, 3]) == rng.key(1, 2, 3)
assert issubclass(smdm.SmdmFormatError, ValueError) and issubclass(smdm.SmdmIOError, OSError)
assert smdm.__file__.startswith(__import__("sys").prefix), smdm.__file__
from pathlib import Path
for name in ("configuration_smdm.py", "modeling_smdm.py"):  # what `smdm convert to-hf` copies next to an MDM
    assert (Path(smdm.__file__).parent / "hf" / name).is_file(), name
# PEP 561: type checkers read the package's annotations and the extension's stubs only with the marker
for name in ("py.typed", "_core.pyi"):
    assert (Path(smdm.__file__).parent / name).is_file(), name
print("wheel OK:", smdm.__file__)
PY
)
