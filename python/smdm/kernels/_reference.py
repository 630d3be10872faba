"""Plain PyTorch references of the smdm CUDA kernels. They define what the kernels compute and are the oracle
of the tests; they run on any device.

`unmask_step_reference` reproduces the CUDA sampler (csrc/unmask_sampler.cuh) bit for bit: every float32
operation below is one correctly rounded IEEE operation done in the same order as in the kernel, log and exp
are the short op sequences `log_f32` / `exp_neg_f32` (mirrors of csrc/smdm_common.cuh), and every sum that
decides something (top-p mass, softmax normaliser, entropy) is an exact integer sum of 31-bit fixed-point
terms, so the order of summation (parallel in the kernel, sequential here) cannot change a result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# --- bit-exact float32 constants (the same bit patterns as csrc/smdm_common.cuh) ---------------------------


def _f32(bits: int) -> float:
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


LN2_HI = _f32(0x3F317200)
LN2_LO = _f32(0x35BFBE8E)
LOG2E = _f32(0x3FB8AA3B)
_LOG_C = [_f32(0x3E638E39), _f32(0x3E924925), _f32(0x3ECCCCCD), _f32(0x3F2AAAAB)]  # 2/9, 2/7, 2/5, 2/3
_EXP_C = [
    _f32(b) for b in (0x37D00D01, 0x39500D01, 0x3AB60B61, 0x3C088889, 0x3D2AAAAB, 0x3E2AAAAB)
]  # 1/8!..1/3!
TWO31 = 2147483648.0
STREAM_GUMBEL = 6
CONFIDENCE_MODES = {"prob": 0, "margin": 1, "neg_entropy": 2, "entropy": 2}  # "entropy" = sum p log p too

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # uint64 constants as two's complement int64
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (read as uint64)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on an int64 tensor read as uint64 (wrapping arithmetic) = smdm.rng.splitmix64."""
    z = x + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of non-negative float32 values, op for op as `smdm::log_f32` (log 0 = -inf)."""
    bits = x.view(torch.int32)
    mant = bits & 0x7FFFFF
    big = (mant | 0x3F800000) > 0x3FB504F3  # m > sqrt(2): use m / 2 and e + 1
    e = (bits >> 23) - 127 + big.to(torch.int32)
    m = torch.where(big, mant | 0x3F000000, mant | 0x3F800000).view(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    s2 = s * s
    p = s2 * _LOG_C[0] + _LOG_C[1]
    p = p * s2 + _LOG_C[2]
    p = p * s2 + _LOG_C[3]
    p = p * s2
    lm = s * 2.0 + s * p
    ef = e.to(torch.float32)
    out = ef * LN2_HI + (ef * LN2_LO + lm)
    return torch.where(x == 0, float("-inf"), out)


def exp_neg_f32(z: torch.Tensor) -> torch.Tensor:
    """exp of float32 values <= 0 (or -inf), op for op as `smdm::exp_neg_f32` (0 below -80)."""
    ok = z >= -80.0
    zc = torch.where(ok, z, 0.0)
    n = torch.round(zc * LOG2E)  # round half to even = rintf
    r = (zc - n * LN2_HI) - n * LN2_LO
    p = r * _EXP_C[0] + _EXP_C[1]
    for c in _EXP_C[2:]:
        p = p * r + c
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(ok, p * scale, 0.0)


def fixed31(v: torch.Tensor) -> torch.Tensor:
    """floor(v * 2^31) as int64 for v in [0, 1] (exact scaling; = `smdm::fixed31`). NaN (and anything
    below 0) gives 0, as the device's saturating `__float2uint_rz` does: a NaN cast to int64 is undefined in
    torch (INT64_MIN on x86), which made the entropy of a row with +inf / NaN logits differ from the kernel's."""
    x = v * TWO31
    return torch.where(x >= 0.0, x, 0.0).to(torch.int64)


def gumbel_keys(seeds: torch.Tensor, step, positions: torch.Tensor) -> torch.Tensor:
    """key(seed, step, position, GUMBEL) per row (int64 holding uint64 bits); seeds, positions (and step, an
    int or a tensor) (N,)."""
    h = splitmix64_t(seeds.to(torch.int64))
    h = splitmix64_t(h ^ (step.to(torch.int64) if isinstance(step, torch.Tensor) else int(step)))
    h = splitmix64_t(h ^ positions.to(torch.int64))
    return splitmix64_t(h ^ STREAM_GUMBEL)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """g[n, v] = -log(-log(u)), u = ((h >> 41) + 0.5) 2^-23 in float32, h = splitmix64(keys[n] ^ v).

    23 bits keep k + 0.5 exact in float32, so u is strictly inside (0, 1) and g is finite (docs/CONTRACTS.md)."""
    v = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = splitmix64_t(keys[:, None] ^ v[None, :])  # (N, V)
    k = (_lsr(h, 41)).to(torch.float32)  # exact: < 2^23
    u = (k + 0.5) * _f32(0x34000000)  # * 2^-23
    return -log_f32(-log_f32(u))


def unmask_step_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    candidates: torch.Tensor,
    seeds: torch.Tensor,
    step: int,
    *,
    uncond_logits: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    confidence: str = "prob",
    n_commit: torch.Tensor | None = None,
    threshold: float | None = None,
    position_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unmasking step (see `smdm.kernels.unmask_step` for the arguments). Updates `tokens` in place and
    returns (pred (B, L) int64 or -1, conf (B, L) float32 or -inf, committed (B, L) bool)."""
    B, L, V = logits.shape
    dev = logits.device
    rows = candidates.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices b * L + j
    pred = torch.full((B * L,), -1, dtype=torch.int64, device=dev)
    conf = torch.full((B * L,), float("-inf"), dtype=torch.float32, device=dev)
    if rows.numel() > 0:
        tok, c = _rows_reference(
            logits.reshape(B * L, V)[rows].to(torch.float32),
            None if uncond_logits is None else uncond_logits.reshape(B * L, V)[rows].to(torch.float32),
            gumbel_keys(seeds.to(dev)[rows // L], step, position_offset + rows % L),
            cfg_scale,
            temperature,
            top_k,
            top_p,
            CONFIDENCE_MODES[confidence],
        )
        pred[rows] = tok
        conf[rows] = c
    pred = pred.view(B, L)
    conf = conf.view(B, L)
    committed = _commit_reference(conf, candidates, n_commit, threshold)
    tokens.copy_(torch.where(committed, pred, tokens))
    return pred, conf, committed


def _rows_reference(c, u, keys, cfg_scale, temperature, top_k, top_p, conf_mode):
    """Token and confidence of N rows of float32 logits (N, V); `keys` (N,) Gumbel keys."""
    N, V = c.shape
    dev = c.device
    if u is None:
        lg = c
    else:  # guided logits u + (w + 1)(c - u), three float32 roundings in the kernel's order
        lg = u + (c - u) * float(np.float32(cfg_scale + 1.0))
    top = torch.argmax(lg, dim=1)  # lowest id on ties
    m = lg.gather(1, top[:, None])  # (N, 1)

    # top-k, then top-p, as prefixes of the (value desc, id asc) order
    vals, idx = torch.sort(lg, dim=1, descending=True, stable=True)
    rank = torch.arange(V, device=dev)[None, :]
    keep_sorted = torch.ones_like(vals, dtype=torch.bool)
    k = min(max(int(top_k), 0), V)
    if 0 < k < V:
        keep_sorted &= rank < k
    if top_p < 1.0:
        q = fixed31(exp_neg_f32(torch.where(keep_sorted, vals, float("-inf")) - m))  # (N, V) int64
        total = q.sum(1)
        need = torch.ceil(total.to(torch.float64) * float(top_p)).to(torch.int64).clamp(min=1)
        if top_p <= 0.0:
            need = torch.ones_like(need)
        cut = (q.cumsum(1) < need[:, None]).sum(1)  # first sorted index whose running mass reaches need
        keep_sorted &= rank <= cut[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    lf = torch.where(keep, lg, float("-inf"))
    valid = lf != float("-inf")

    z = lf - m
    e = exp_neg_f32(z)
    s_fix = fixed31(e).sum(1)
    a_fix = torch.where(valid, fixed31(-(e * torch.where(valid, z, 0.0))), 0).sum(1)
    s_f = (s_fix.to(torch.float64) * 2.0**-31).to(torch.float32)

    t32 = float(np.float32(temperature))
    if t32 > 0.0:
        t = torch.full(
            (1, 1), t32, dtype=torch.float32, device=dev
        )  # a tensor: true division on every device
        score = lf / t + gumbel_noise(keys, V)
        score = torch.where(valid & ~score.isnan(), score, float("-inf"))  # NaN (-inf + inf) never wins
        best = score.max(dim=1)
        tok = torch.where(best.values == float("-inf"), top, torch.argmax(score, dim=1))  # = the kernel
    else:
        tok = top
    if conf_mode == 0:
        e_tok = exp_neg_f32(lf.gather(1, tok[:, None]).squeeze(1) - m.squeeze(1))
        conf = e_tok / s_f
    elif conf_mode == 1:
        l2 = lf.scatter(1, top[:, None], float("-inf")).max(dim=1).values
        e2 = torch.where(l2 == float("-inf"), 0.0, exp_neg_f32(l2 - m.squeeze(1)))
        conf = (1.0 - e2) / s_f
    else:
        a_f = (-(a_fix.to(torch.float64) * 2.0**-31)).to(torch.float32)
        conf = a_f / s_f - log_f32(s_f)
    return tok, conf


def choose_tokens_reference(
    logits: torch.Tensor,
    *,
    seeds,
    positions,
    step,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    confidence: str = "prob",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (N,) int64 and confidence (N,) float32 per row of already-guided logits (N, V): the row part of
    `unmask_step_reference` with a (seed, position, step) per row (each an int or an (N,) tensor)."""
    N, V = logits.shape
    dev = logits.device

    def col(x):
        return torch.as_tensor(x, dtype=torch.int64).to(dev).expand(N)

    if N == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    return _rows_reference(
        logits.to(torch.float32),
        None,
        gumbel_keys(col(seeds), col(step), col(positions)),
        0.0,
        temperature,
        top_k or 0,
        1.0 if top_p is None else top_p,
        CONFIDENCE_MODES[confidence],
    )


def select_positions_reference(
    confidence: torch.Tensor, candidates: torch.Tensor, n=None, threshold: float | None = None
) -> torch.Tensor:
    """(B, P) bool: per row the n[b] most confident candidates (ties: lower position), or every candidate with
    confidence >= threshold plus the most confident one (the commit part of `unmask_step_reference`)."""
    if n is not None:
        n = torch.as_tensor(n, dtype=torch.int64).to(confidence.device).expand(confidence.shape[0])
    return _commit_reference(confidence.to(torch.float32), candidates, n, threshold)


def _commit_reference(conf, candidates, n_commit, threshold):
    """Per sequence: the n most confident candidates, or conf >= tau plus the most confident one. Candidates
    are ranked by (confidence desc, position asc) in torch.sort's order (NaN first, -0 == +0) and always
    above the other positions, even at confidence -inf (= `smdm.sampling.select_positions`)."""
    B, L = conf.shape
    masked = torch.where(candidates, conf, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    first = torch.sort(candidates.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, first)  # candidates first, each group still in (conf desc, position asc) order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=conf.device).expand(B, L))
    if n_commit is not None:
        n = torch.minimum(n_commit.to(conf.device, torch.int64), candidates.sum(1))
        return candidates & (rank < n[:, None])
    tau = float(np.float32(threshold))
    return candidates & ((conf >= tau) | (rank == 0))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Bidirectional attention in float32 math: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); query i sees key j iff
    their segment ids are equal (when given). Rows that see no key are 0. Returns `out_dtype` (default: q's)
    dtype."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if Hkv != Hq:  # grouped-query attention: query head h reads key/value head h // (Hq / Hkv)
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    if q_segment_ids is not None:
        allowed = q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]  # (B, 1, Lq, Lk)
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(allowed.any(-1, keepdim=True), p, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vf).to(out_dtype or q.dtype)


def attention_plain(q, k, v, *, q_segment_ids=None, k_segment_ids=None, scale: float | None = None):
    """Plain PyTorch attention at the inputs' precision: both matrix products in q's dtype (bf16/fp16), the
    softmax in float32 rounded back to q's dtype. The yardstick of the kernels' accuracy rule (flash-attention's):
    the kernel's error against `attention_reference` is at most 2x this function's. (SDPA's math backend is no
    such yardstick: since torch 2.5 it computes bf16/fp16 inputs in float32.)"""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, Hq, Lq, Lk)
    if q_segment_ids is not None:
        s = s.masked_fill(q_segment_ids[:, None, :, None] != k_segment_ids[:, None, None, :], float("-inf"))
    p = torch.softmax(s.float(), -1).nan_to_num(0.0).to(q.dtype)  # rows that see no key: 0
    return p @ v
