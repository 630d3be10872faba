"""The output head and the cross-entropy as one chunked op, for the training losses.

    linear_cross_entropy(h, W, y, w) = sum_i w_i · CE(h_i W^T, y_i)        h: (M, d), W: (V, d), y, w: (M,)

`linear_cross_entropy_reference` defines it in plain PyTorch and is the oracle of the tests. The plain form
holds the (M, V) logits, their float32 copy and, in backward, their gradient at once: for the ARM twin of the
1028M config at L = 2048 and 8 sequences per GPU (M = 16384 rows, V = 32000) that is 2.1 GB per float32 copy.
The chunked form runs `chunk_rows` rows at a time, never holding more than one chunk's logits, and computes the
gradients of h and W in the forward pass (every loss of the trainer is this weighted sum, so the backward pass
only scales them by the incoming gradient): no recomputation, the same matmul FLOPs as the plain form, and
extra memory of one (M, d) gradient of h (the plain backward makes it too) and one float32 (V, d) gradient of W.

Precision is the plain form's under autocast: h and W in the autocast dtype for the matmuls, logits upcast to
at least float32 for the softmax, the logits' gradient cast back to the matmul dtype. The gradient of W is
summed over the chunks in at least float32. The weights w get their gradient (the per-row CE) too, though the
trainer's weights come from the forward process and need none. `SMDM_KERNELS=reference` forces the plain form.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

LOGITS_BYTES = 1 << 27  # default chunk: the rows whose float32 logits take 128 MiB (V = 32000: 1048 rows)


def linear_cross_entropy_reference(h, weight, targets, row_weights):
    """sum_i row_weights[i] · CE(h_i W^T, targets_i) through the full (M, V) logits, CE in at least float32
    (under autocast the matmul runs in the autocast dtype, as `model.head` does)."""
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * row_weights.to(ce.dtype)).sum()


def _matmul_dtype(h, weight):
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if h.dtype != weight.dtype:  # what F.linear would refuse
        raise ValueError(f"linear_cross_entropy: hidden states are {h.dtype} but the head's weight is {weight.dtype}")
    return h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, chunk_rows: int, dtype: torch.dtype, grad_mode: bool):
        M = h.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmax, loss and the sum of W's gradient
        # needs_input_grad says True under no_grad too: without grad mode there is no backward to prepare
        need_h, need_w, _, need_rw = (grad_mode and n for n in ctx.needs_input_grad[:4])
        w_mm = weight.to(dtype)
        rw = row_weights.to(acc)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        ce_all = torch.empty(M, dtype=acc, device=h.device) if need_rw else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, M, chunk_rows):
            e = min(M, s + chunk_rows)
            hc = h[s:e].to(dtype)
            logits = (hc @ w_mm.T).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            y = targets[s:e, None]
            ce = lse - logits.gather(1, y).squeeze(1)
            loss += (ce * rw[s:e]).sum()
            if ce_all is not None:
                ce_all[s:e] = ce
            if need_h or need_w:  # d loss / d logits = w_i (softmax - onehot), in place of the logits
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, y, torch.full(y.shape, -1.0, dtype=acc, device=h.device))
                g = g.mul_(rw[s:e, None]).to(dtype)
                if need_h:
                    grad_h[s:e] = (g @ w_mm).to(h.dtype)
                if need_w:
                    grad_w += (g.T @ hc).to(acc)
            del logits
        ctx.save_for_backward(grad_h, grad_w, ce_all)
        ctx.dtypes = (weight.dtype, row_weights.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, ce_all = ctx.saved_tensors
        w_dtype, rw_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        grw = None if ce_all is None else (ce_all * grad_out).to(rw_dtype)
        return gh, gw, None, grw, None, None, None


def linear_cross_entropy(h, weight, targets, row_weights, *, chunk_rows: int | None = None):
    """sum_i row_weights[i] · CE(h_i W^T, targets_i), chunked (module docstring). h: (M, d), weight: (V, d),
    targets: (M,) int in [0, V), row_weights: (M,) float. Returns a 0-dim tensor in at least float32. Only one
    backward pass (the gradients are computed in the forward pass); without grad mode it computes the loss alone.
    chunk_rows: rows per chunk (default: 128 MiB of float32 logits)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden states {tuple(h.shape)} and head weight "
                         f"{tuple(weight.shape)} are not (M, d) and (V, d)")
    if targets.shape != (h.shape[0],) or row_weights.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} and row weights "
                         f"{tuple(row_weights.shape)} must be ({h.shape[0]},), one per row of h")
    if chunk_rows is None:
        chunk_rows = max(1, LOGITS_BYTES // (4 * weight.shape[0]))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if os.environ.get("SMDM_KERNELS", "").strip().lower() == "reference":
        return linear_cross_entropy_reference(h, weight, targets, row_weights)
    dtype = _matmul_dtype(h, weight)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, row_weights, chunk_rows, dtype, torch.is_grad_enabled())


def cross_entropy_rows(h, weight, targets, *, chunk_rows: int | None = None):
    """Per-row CE(h_i W^T, y_i), (M,) in at least float32, for evaluation: `chunk_rows` rows at a time (default as
    `linear_cross_entropy`), each chunk exactly `F.cross_entropy(F.linear(h, W) upcast, y, reduction="none")` (so
    under autocast the matmul runs in its dtype, as `model.head` does). Under no_grad it never holds more than one
    chunk's logits (with grad, autograd would keep every chunk's: use `linear_cross_entropy` for training)."""
    if chunk_rows is None:
        chunk_rows = max(1, LOGITS_BYTES // (4 * weight.shape[0]))

    def ce(hc, yc):
        logits = F.linear(hc, weight)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), yc, reduction="none")

    M = h.shape[0]
    if M <= chunk_rows or os.environ.get("SMDM_KERNELS", "").strip().lower() == "reference":
        return ce(h, targets)
    return torch.cat([ce(h[s:s + chunk_rows], targets[s:s + chunk_rows]) for s in range(0, M, chunk_rows)])

