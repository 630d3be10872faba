# python -m pytest tests/test_linear_ce.py -q
"""`smdm.linear_ce`: the chunked head + cross-entropy equals its plain reference (loss and the gradients of h,
W and the row weights, any chunk size, float64 / float32 / CPU bf16 autocast), never makes a tensor of all rows'
logits, scales its gradients by the incoming one (gradient accumulation), and the training losses that use it
(`mdm_loss`, `sft_loss`, `ar_loss`, `ar_sft_loss`) give the reference's loss and parameter gradients."""

from __future__ import annotations

import pytest
import torch
from smdm import linear_ce
from smdm.linear_ce import cross_entropy_rows, linear_cross_entropy, linear_cross_entropy_reference
from torch.utils._python_dispatch import TorchDispatchMode


def inputs(M=37, d=16, V=29, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, d, generator=g, dtype=dtype).requires_grad_()
    W = (torch.randn(V, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
    y = torch.randint(0, V, (M,), generator=g)
    w = (torch.rand(M, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return h, W, y, w


def loss_and_grads(fn, h, W, y, w, **kw):
    for t in (h, W, w):
        t.grad = None
    loss = fn(h, W, y, w, **kw)
    loss.backward()
    return loss.detach(), h.grad.clone(), W.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 1000, None])
def test_equals_the_reference_in_float64(chunk_rows):
    h, W, y, w = inputs()
    fast = loss_and_grads(linear_cross_entropy, h, W, y, w, chunk_rows=chunk_rows)
    ref = loss_and_grads(linear_cross_entropy_reference, h, W, y, w)
    for a, b, name in zip(fast, ref, ("loss", "grad h", "grad W", "grad row weights")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_float32_matches_the_float64_reference():
    h, W, y, w = inputs(M=300, d=32, V=500, dtype=torch.float32, seed=1)
    fast = loss_and_grads(linear_cross_entropy, h, W, y, w, chunk_rows=64)
    ref = loss_and_grads(linear_cross_entropy_reference, *(t.detach().double().requires_grad_() for t in (h, W)),
                         y, w.detach().double().requires_grad_())
    assert all(t.dtype == torch.float32 for t in fast)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)


def test_bf16_autocast_is_the_plain_forms_precision():
    """Under autocast the matmuls run in bf16 (as `model.head` does), the softmax in float32; the parameters'
    gradient comes back in their own dtype (float32)."""
    h, W, y, w = inputs(M=200, d=64, V=300, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = loss_and_grads(linear_cross_entropy, h, W, y, w, chunk_rows=48)
        ref = loss_and_grads(linear_cross_entropy_reference, h, W, y, w)
    exact = loss_and_grads(linear_cross_entropy_reference, *(t.detach().double().requires_grad_() for t in (h, W)),
                           y, w.detach().double().requires_grad_())
    assert [t.dtype for t in fast] == [torch.float32] * 4
    for a, b, c in zip(fast, ref, exact):
        err_fast, err_ref = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert err_fast <= 2 * err_ref + 1e-6, (err_fast, err_ref)  # as close to float64 as the plain bf16 form
        assert err_ref > 1e-4  # the measure sees bf16's rounding (float32 matmuls would be ~1e-6)


class LogitRows(TorchDispatchMode):
    """The most rows of logits (new tensors, not views such as W.T, whose last dimension is the vocabulary size
    V) that any op makes while the mode is on."""

    def __init__(self, V: int):
        super().__init__()
        self.V, self.most = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.V
                    and t.untyped_storage().data_ptr() not in given):  # not a view of an input
                self.most = max(self.most, t.numel() // self.V)
        return out


class MatmulCount(TorchDispatchMode):
    """How many matrix products run while the mode is on."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
        return func(*args, **(kwargs or {}))


def test_never_makes_all_rows_logits():
    M, d, V, chunk = 400, 8, 1000, 50
    h, W, y, w = inputs(M=M, d=d, V=V, dtype=torch.float32)
    with LogitRows(V) as fast:
        linear_cross_entropy(h, W, y, w, chunk_rows=chunk).backward()
    with LogitRows(V) as plain:
        linear_cross_entropy_reference(h, W, y, w).backward()
    assert plain.most == M  # the measure sees the plain form's logits
    assert fast.most == chunk  # one chunk's logits at a time


def test_gradients_scale_with_the_incoming_gradient():
    """Gradient accumulation divides the loss: the gradients computed in the forward pass are scaled."""
    h, W, y, w = inputs(seed=3)
    _, gh, gW, gw = loss_and_grads(linear_cross_entropy, h, W, y, w, chunk_rows=8)
    for t in (h, W, w):
        t.grad = None
    (linear_cross_entropy(h, W, y, w, chunk_rows=8) * -0.25).backward()
    for a, b in zip((h.grad, W.grad, w.grad), (gh, gW, gw)):
        torch.testing.assert_close(a, -0.25 * b, rtol=1e-14, atol=0)


def test_without_rows_or_without_grad():
    h, W, y, w = inputs(M=0)
    loss = linear_cross_entropy(h, W, y, w)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.shape == (0, 16) and W.grad.abs().max() == 0 and torch.isfinite(W.grad).all()
    h, W, y, w = inputs(seed=4)
    with torch.no_grad(), MatmulCount() as mode:  # no gradients prepared: one matmul per chunk, the logits
        loss = linear_cross_entropy(h, W, y, w, chunk_rows=4)
    assert not loss.requires_grad and mode.n == 10
    with MatmulCount() as mode:  # with grad mode also those of h's and W's gradients
        linear_cross_entropy(h, W, y, w, chunk_rows=4)
    assert mode.n == 30
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, W, y, w).detach(), rtol=1e-12, atol=0)


def test_bad_input_is_a_clear_error():
    h, W, y, w = inputs()
    with pytest.raises(ValueError, match=r"\(37, 16\) and head weight \(29, 15\)"):
        linear_cross_entropy(h, W[:, :15], y, w)
    with pytest.raises(ValueError, match=r"targets \(36,\)"):
        linear_cross_entropy(h, W, y[:36], w)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        linear_cross_entropy(h, W, y, w, chunk_rows=0)
    with pytest.raises(ValueError, match="torch.float32 but the head's weight is torch.float64"):
        linear_cross_entropy(h.float(), W, y, w)


def test_smdm_kernels_reference_forces_the_plain_form(monkeypatch):
    h, W, y, w = inputs(M=400, d=8, V=1000, dtype=torch.float32)
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    with LogitRows(1000) as mode:
        linear_cross_entropy(h, W, y, w, chunk_rows=50)
    assert mode.most == 400


def test_cross_entropy_rows_is_the_plain_per_row_ce_chunk_by_chunk():
    """Evaluation's per-row CE: each chunk is the plain computation (a GEMM's rows may round differently for
    another row count, hence the float32 tolerance), and under no_grad one chunk's logits at a time."""
    import torch.nn.functional as F

    h, W, y, _ = (t.detach() if isinstance(t, torch.Tensor) else t for t in inputs(M=400, d=8, V=1000,
                                                                                 dtype=torch.float32, seed=7))
    plain = F.cross_entropy(F.linear(h, W), y, reduction="none")
    with torch.no_grad(), LogitRows(1000) as mode:
        rows = cross_entropy_rows(h, W, y, chunk_rows=64)
    assert mode.most == 64 and rows.shape == (400,)
    torch.testing.assert_close(rows, plain, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmul in bf16, CE in float32, as model.head
        auto = cross_entropy_rows(h, W, y, chunk_rows=64)
        ref = F.cross_entropy(F.linear(h, W).float(), y, reduction="none")
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=1e-6, atol=1e-6)


# ---- the training losses on it ----


def tiny(causal=False, V=23):
    from smdm.model import ModelConfig, build_model

    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, vocab_size=V, max_seq_len=32, causal=causal)
    return build_model(cfg, seed=0).double()


def training_losses():
    """name -> (model, loss closure) for the four training losses on a batch with several chunks' rows."""
    from smdm.diffusion import ar_loss, mdm_loss, sft_loss
    from smdm.sft import ar_sft_loss

    g = torch.Generator().manual_seed(5)
    B, L = 4, 16
    mdm, arm = tiny(), tiny(causal=True)
    x0 = torch.randint(0, 23, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6
    weight = torch.where(mask, 1 / 0.6, 0.0).double()
    noisy = x0.masked_fill(mask, mdm.mask_id)
    lens = torch.tensor([3, 5, 0, 7])
    sft_mask = mask & (torch.arange(L) >= lens[:, None])
    return {
        "mdm_loss": (mdm, lambda: mdm_loss(mdm, noisy, x0, mask, weight)),
        "sft_loss": (mdm, lambda: sft_loss(mdm, x0.masked_fill(sft_mask, mdm.mask_id), x0, sft_mask, weight, lens)),
        "ar_loss": (arm, lambda: ar_loss(arm, x0)),
        "ar_sft_loss": (arm, lambda: ar_sft_loss(arm, x0, lens, torch.tensor([16, 12, 9, 16]))),
    }


@pytest.mark.parametrize("name", ["mdm_loss", "sft_loss", "ar_loss", "ar_sft_loss"])
def test_training_losses_equal_their_plain_form(name, monkeypatch):
    monkeypatch.setattr(linear_ce, "LOGITS_BYTES", 4 * 23 * 7)  # 7 rows per chunk: several chunks
    model, loss_fn = training_losses()[name]

    def run():
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    with LogitRows(23) as mode:
        fast, fast_grads = run()
    assert mode.most == 7  # the chunked form ran
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    with LogitRows(23) as mode:
        ref, ref_grads = run()
    assert mode.most > 7
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_the_plain_form_in_less_memory():
    """On the GPU under bf16 autocast (the trainer's precision): as close to float64 as the plain form, and the
    peak memory of forward + backward below the plain form's by at least the float32 logits of all rows."""
    M, d, V = 8192, 1024, 32000
    h, W, y, w = (t.detach().cuda() for t in inputs(M=M, d=d, V=V, dtype=torch.float32, seed=6))
    w = w / M
    exact = linear_cross_entropy_reference(h.double(), W.double(), y, w.double())

    def run(fn):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hh, WW, y, w)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach().double(), torch.cuda.max_memory_allocated() - base

    (fast, fast_peak), (plain, plain_peak) = run(linear_cross_entropy), run(linear_cross_entropy_reference)
    assert (fast - exact).abs() <= 2 * (plain - exact).abs() + 1e-4 * exact.abs()
    assert fast_peak + M * V * 4 <= plain_peak, (fast_peak, plain_peak)
