# python -m pytest benches/bench_mask.py --benchmark-group-by=group --benchmark-columns=min,median,ops
"""Forward process (masking) throughput: the Rust core vs the same math in torch on CPU (the DESIGN §8
baseline, target >= 3x per token) and the numpy reference, each group one batch shape, all variants
checked equal before timing. `smdm bench mask` prints the same comparison as a table + JSON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from smdm.benchmarks.mask import forward_process_torch, one_thread
from smdm.diffusion import forward_process, forward_process_reference

_core = pytest.importorskip("smdm._core")

SHAPES = [(8, 2048), (16, 2048), (32, 2048)]
KW = dict(seed=1234, step=5, mask_id=32000, crop_prob=0.0)


def _tokens(B, L):
    return np.random.default_rng(0).integers(0, 32000, size=(B, L), dtype=np.int64)


def _variant(name, x):
    xt = torch.from_numpy(x)
    return {
        "rust": lambda: _core.forward_process(x, **KW),
        "rust_api": lambda: forward_process(xt, **KW),
        "torch": lambda: forward_process_torch(xt, **KW),
        # torch's intra-op threads can collapse when the cores are shared: time one thread too
        "torch_1thread": lambda: one_thread(forward_process_torch, xt, **KW),
        "numpy_reference": lambda: forward_process_reference(x, **KW),
    }[name]


def _as_numpy(out):
    if hasattr(out, "noisy_ids"):  # NoisyBatch
        return [out.noisy_ids.numpy(), out.mask.numpy(), out.t.numpy(), out.p.numpy(), out.weight.numpy()]
    return [np.asarray(a) for a in out[:5]]


@pytest.mark.parametrize("name", ["rust", "rust_api", "torch", "torch_1thread", "numpy_reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}xL{n}" for b, n in SHAPES])
def test_mask(benchmark, shape, name):
    x = _tokens(*shape)
    benchmark.group = f"mask {shape[0]}x{shape[1]}"
    benchmark.extra_info["tokens"] = shape[0] * shape[1]
    out = benchmark(_variant(name, x))
    want = _core.forward_process(x, **KW)
    for got, ref in zip(_as_numpy(out), want[:5]):
        np.testing.assert_array_equal(got, ref)
