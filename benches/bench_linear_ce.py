# python -m pytest benches/bench_linear_ce.py --benchmark-group-by=group --benchmark-columns=min,median,ops
"""The training loss's output head + cross-entropy, forward and backward: `smdm.linear_ce` (chunks of rows,
gradients made in the forward pass; what the trainer runs) against the plain form through all rows' logits
(`linear_cross_entropy_reference`) in the same process, each group one shape (rows M = the masked or predicted
tokens of a batch, width d, vocabulary 32000), float32 on the CPU. Both are checked equal (loss and gradients)
before timing. Peak memory: benches/train_memory.py --chunked-ce (subprocesses, RSS)."""

from __future__ import annotations

import pytest
import torch
from smdm.linear_ce import linear_cross_entropy, linear_cross_entropy_reference

SHAPES = [(2048, 256), (4096, 512)]  # (M, d)
V = 32000
VARIANTS = {"chunked": linear_cross_entropy, "plain": linear_cross_entropy_reference}


def _inputs(M, d):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, d, generator=g).requires_grad_()
    W = (torch.randn(V, d, generator=g) / d**0.5).requires_grad_()
    y = torch.randint(0, V, (M,), generator=g)
    w = torch.rand(M, generator=g) / M
    return h, W, y, w


def _step(fn, h, W, y, w):
    h.grad = W.grad = None
    loss = fn(h, W, y, w)
    loss.backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}xd{d}" for m, d in SHAPES])
def test_linear_ce(benchmark, shape, name):
    args = _inputs(*shape)
    want = [t.clone() for t in _step(linear_cross_entropy_reference, *args)]
    got = _step(VARIANTS[name], *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    benchmark.group = f"linear_ce forward+backward M{shape[0]} d{shape[1]} V{V}"
    benchmark.extra_info["rows"] = shape[0]
    benchmark.pedantic(_step, args=(VARIANTS[name], *args), rounds=5, warmup_rounds=1)
