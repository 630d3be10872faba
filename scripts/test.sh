#!/usr/bin/env bash
# bash scripts/test.sh — set up .venv (if needed), build the Rust extension, run cargo test, clippy, ruff, pytest.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings
cargo test -q
bash scripts/check_wheel.sh
ruff check python tests benches
python -m pytest -q "$@"
