"""Diffusion math of masked diffusion models (DESIGN §4): the forward process (masking), the losses and the
Monte Carlo ELBO. The masking part (top of this file) and the losses (below the marker) have different owners.
"""

# ---- losses ----
# Losses and likelihoods (DESIGN §4). The output head and the cross-entropy are computed only at the rows that
# enter the loss (`model.head(h[mask])`): memory and FLOPs of the vocabulary projection scale with the masked
# fraction instead of B·L.
import math as _math  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

import numpy as _np  # noqa: E402
import torch as _torch  # noqa: E402
import torch.nn.functional as _F  # noqa: E402

from smdm import rng as _rng  # noqa: E402


def _masked_ce(model, noisy, x0, mask, *, segment_ids=None, positions=None):
    """Cross-entropy (float32) at the masked rows only, in row-major order of `mask`: (M,)."""
    h = model.hidden(noisy, segment_ids=segment_ids, positions=positions)  # (B, L, d)
    logits = model.head(h[mask])  # (M, V): the head runs on masked rows only
    return _F.cross_entropy(logits.float(), x0[mask], reduction="none")  # (M,)


def mdm_loss(model, noisy, x0, mask, weight, *, segment_ids=None, positions=None):
    """MDM pretraining loss (paper Eq. 3 with the linear schedule): sum over masked tokens of CE(x0) / p,
    divided by B·L (all tokens, masked or not).

    noisy, x0: (B, L) int64; mask: (B, L) bool; weight: (B, L) float = 1/p at masked tokens (<= 1/eps, from
    `forward_process`). A batch without a masked token gives an exact, finite zero (with a graph)."""
    ce = _masked_ce(model, noisy, x0, mask, segment_ids=segment_ids, positions=positions)  # (M,)
    return (ce * weight[mask].to(ce.dtype)).sum() / mask.numel()


def sft_loss(model, noisy, x0, mask, weight, prompt_lens, *, positions=None):
    """SFT loss (SMDM / LLaDA): prompt tokens are never masked (the forward process got `prompt_lens`); each
    sequence's sum of CE / p over masked answer tokens is divided by its number of non-prompt tokens
    (answer + EOS padding), then averaged over the batch.

    prompt_lens: (B,) int. `noisy` may have its prompt replaced by masks (`drop_prompts`, standard CFG
    training); those positions are inputs only and never enter the loss."""
    B, L = x0.shape
    ce = _masked_ce(model, noisy, x0, mask, positions=positions)  # (M,)
    answer_len = (L - _torch.as_tensor(prompt_lens, device=x0.device)).clamp(min=1)  # (B,)
    row = _torch.arange(B, device=x0.device)[:, None].expand(B, L)[mask]  # (M,) the sequence of each row
    per_row = ce * weight[mask].to(ce.dtype) / answer_len[row].to(ce.dtype)
    return per_row.sum() / B


def drop_prompts(noisy, prompt_lens, mask_id: int, *, seed: int, step: int, sample_offset: int = 0,
                 p_uncond: float = 0.1):
    """Standard classifier-free-guidance training: with probability p_uncond a sequence's prompt is replaced
    by mask tokens (draw key(seed, step, sample, UNCOND, 0), so it does not depend on the batch split).
    Returns (noisy', dropped (B,) bool). Does not change which tokens enter the loss."""
    B, L = noisy.shape
    u = _np.array([_rng.uniform(_rng.key(seed, step, sample_offset + i, _rng.Stream.UNCOND, 0))
                   for i in range(B)])
    dropped = _torch.as_tensor(u < p_uncond, device=noisy.device)
    lens = _torch.as_tensor(prompt_lens, device=noisy.device)
    prompt = _torch.arange(L, device=noisy.device)[None, :] < lens[:, None]  # (B, L)
    out = noisy.masked_fill(prompt & dropped[:, None], mask_id)
    return out, dropped


def ar_loss(model, tokens, *, segment_ids=None):
    """Next-token cross-entropy of the autoregressive twin over windows of L + 1 tokens: (B, L+1) -> mean
    over the B·L predictions. With `segment_ids` attention stays inside each document (the first token of a
    document is predicted from the EOS that closes the previous one, which sees only its own document)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg = None if segment_ids is None else segment_ids[:, :-1]
    logits = model(inputs, segment_ids=seg)  # (B, L, V)
    return _F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@_dataclass
class Elbo:
    """Monte Carlo ELBO of -log p(target | prompt) per sequence, in nats."""

    nll: _torch.Tensor  # (B,) float64: estimate of the negative ELBO (an upper bound on the NLL)
    stderr: _torch.Tensor  # (B,) float64: standard error of the estimate (iid formula; conservative under
    # stratification, which only lowers the variance)
    n_tokens: _torch.Tensor  # (B,) target tokens per sequence (nll / n_tokens is nats per token)
    n_samples: int


def _elbo_masks(B, L, n_samples, first, count, seed, row_ids, t, target):
    """Masks (count, B, L) for samples [first, first+count): token j of row b in sample k is masked iff
    uniform(splitmix64(key(seed, k, row_id_b, TOKEN) ^ j)) < t_k, and j is a target position."""
    ks = _np.arange(first, first + count, dtype=_np.uint64)
    keys = _np.array([[_rng.key(seed, int(k), int(r), _rng.Stream.TOKEN) for r in row_ids] for k in ks],
                     dtype=_np.uint64)  # (count, B)
    u = _rng.uniform(_rng.splitmix64(keys[:, :, None] ^ _np.arange(L, dtype=_np.uint64)))  # (count, B, L)
    mask = u < t[first:first + count, None, None]
    return _torch.from_numpy(mask) & target[None].cpu()


@_torch.no_grad()
def elbo_nll(model, tokens, *, prompt_lens=None, segment_ids=None, n_samples: int = 128, seed: int = 0,
             row_ids=None, max_rows: int = 64, stratified: bool = True) -> Elbo:
    """Monte Carlo ELBO (DESIGN §4, paper Eq. 4): -log p(target | prompt) <= E_t [ (1/t) sum_{masked} CE ].

    tokens: (B, L) prompt + target (a packed window is all target: prompt_lens None). The prompt stays clean
    and only target tokens are masked, each independently with probability t_k. t is stratified over the
    samples: t_k = (k + 1 - u) / n_samples with one shared u (so t in (0, 1]);
    NLL ≈ mean_k sum_masked CE / t_k.
    The draws are keyed by (seed, sample, row id) only, so the estimate does not depend on the batch layout
    (`row_ids` default arange(B)). Rows are evaluated `max_rows` (sample, sequence) pairs per forward pass."""
    if n_samples < 2:
        raise ValueError(f"elbo_nll needs n_samples >= 2 for a standard error, got {n_samples}")
    mask_id = model.config.mask_id
    if mask_id is None:
        raise ValueError("elbo_nll is for the MDM (a bidirectional model); the ARM's NLL is exact (ar_loss)")
    device = tokens.device
    B, L = tokens.shape
    pos = _torch.arange(L, device=device)[None, :]
    if prompt_lens is None:
        target = _torch.ones(B, L, dtype=_torch.bool, device=device)
    else:
        target = pos >= _torch.as_tensor(prompt_lens, device=device)[:, None]  # (B, L)
    row_ids = _np.arange(B) if row_ids is None else _np.asarray(row_ids)
    if stratified:
        u = _rng.uniform(_rng.key(seed, 0, 0, _rng.Stream.STRATIFIED, 0))
        t = (_np.arange(n_samples) + 1.0 - u) / n_samples  # (n,) in (0, 1]
    else:
        keys = [_rng.key(seed, k, 0, _rng.Stream.TIME, 0) for k in range(n_samples)]
        t = 1.0 - _rng.uniform(_np.array(keys, dtype=_np.uint64))  # (n,) in (0, 1]
    per_sample = _torch.zeros(n_samples, B, dtype=_torch.float64)
    chunk = max(1, max_rows // B)  # samples per forward pass
    for first in range(0, n_samples, chunk):
        count = min(chunk, n_samples - first)
        mask = _elbo_masks(B, L, n_samples, first, count, seed, row_ids, t, target.cpu())  # (c, B, L)
        mask = mask.to(device)
        x0 = tokens[None].expand(count, B, L)
        noisy = _torch.where(mask, _torch.full_like(x0, mask_id), x0).reshape(count * B, L)
        seg = None if segment_ids is None else segment_ids[None].expand(count, B, L).reshape(count * B, L)
        flat = mask.reshape(count * B, L)
        ce = _masked_ce(model, noisy, x0.reshape(count * B, L), flat, segment_ids=seg).double()  # (M,)
        row = _torch.arange(count * B, device=device)[:, None].expand(count * B, L)[flat]
        sums = _torch.zeros(count * B, dtype=_torch.float64, device=device).index_add_(0, row, ce)
        per_sample[first:first + count] = (sums.reshape(count, B).cpu()
                                           / _torch.from_numpy(t[first:first + count])[:, None])
    nll = per_sample.mean(0)
    stderr = per_sample.std(0, unbiased=True) / _math.sqrt(n_samples)
    return Elbo(nll=nll, stderr=stderr, n_tokens=target.sum(1).cpu(), n_samples=n_samples)


def elbo_exact(model, tokens, prompt_lens=None) -> _torch.Tensor:
    """The ELBO of `elbo_nll` computed exactly by enumerating every mask set M of the target positions (tiny
    targets only, 2^T forward rows per sequence): sum_M [sum_{i in M} CE_i(x_M)] · (|M|-1)! (T-|M|)! / T!,
    the integral over t of t^|M|-1 (1-t)^(T-|M|). Returns (B,) float64. Used as the oracle in tests."""
    B, L = tokens.shape
    out = _torch.zeros(B, dtype=_torch.float64)
    for b in range(B):
        p0 = 0 if prompt_lens is None else int(prompt_lens[b])
        T = L - p0
        if T > 16:
            raise ValueError(f"elbo_exact enumerates 2^T mask sets; T={T} is too long")
        sets = _torch.tensor([[(m >> j) & 1 for j in range(T)] for m in range(1, 2 ** T)], dtype=_torch.bool)
        mask = _torch.zeros(len(sets), L, dtype=_torch.bool)
        mask[:, p0:] = sets
        x0 = tokens[b].cpu()[None].expand(len(sets), L)
        noisy = _torch.where(mask, _torch.full_like(x0, model.config.mask_id), x0)
        with _torch.no_grad():
            logp = _torch.log_softmax(model(noisy.to(tokens.device)).double(), -1).cpu()  # (S, L, V)
        ce = -logp.gather(-1, x0[..., None])[..., 0]  # (S, L)
        k = sets.sum(1)
        w = _torch.tensor([_math.factorial(int(m) - 1) * _math.factorial(T - int(m)) / _math.factorial(T)
                           for m in k], dtype=_torch.float64)
        out[b] = ((ce * mask).sum(1) * w).sum()
    return out
