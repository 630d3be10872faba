# python -m pytest -q tests/test_gpu_suite.py
"""The GPU suite's CPU dry run: `benches/gpu_suite.py --smoke` walks every section (ceilings, sampler,
attention, generation, training) on tiny shapes with the PyTorch references, so a Python error in the script is
caught here and not on a scarce GPU machine. Only the code paths are checked, never the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_suite.py"), "--smoke", "--skip-tests",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert r["smoke"] is True
    assert not (tmp_path / "gpu_suite.json.tmp").exists()
    for section in ("env", "build", "ceilings", "sampler", "attention", "model"):
        assert section in r and "error" not in r[section], (section, r.get(section))
    assert r["ceilings"]["copy_GBps"] > 0 and r["ceilings"]["bf16_gemm_TFLOPs"] > 0
    for name, s in r["sampler"].items():  # the reference against itself: identical by construction
        assert s["identical_to_reference"] is True, name
        assert s["rows"] > 0 and s["kernel"]["median_ms"] > 0, name
    for name, s in r["attention"].items():
        assert s["max_abs_err_vs_fp32"] < 0.05 and "err_ratio_vs_sdpa_math" in s, name
    gen = r["model"]["generate"]
    assert gen["arm kv-cache"]["tokens_per_s"] > 0
    for label in ("mdm steps=gen/4", "mdm blocks 32 prefix-cache steps=gen/4"):
        assert gen[label]["over_arm"] > 0 and gen[label]["forward_passes"] > 0, label
    train = r["model"]["train"]
    assert isinstance(train, dict) and train["tokens_per_s"] > 0 and train["mfu_6N"] > 0, train
    assert "every number above is meaningless" in p.stdout  # the table is printed last and says what it is


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_suite_without_cuda_says_so():
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_suite.py"), "--out", "/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--smoke" in p.stderr
