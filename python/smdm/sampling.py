# python -c "import smdm; print(smdm.generate)"   (tests: pytest tests/test_sampling.py)
"""Guided generation: the reverse process of the masked diffusion model (DESIGN §4) and its ARM twin.

    out = generate(model, prompts, gen_length=128, steps=128, sampler="low_confidence", ...)
    out.tokens        # generated ids per prompt (without the prompt; cut before the first EOS)
    filled = infill(model, ids, mask_positions, ...)

Samplers (`SAMPLERS`, a plain name -> commit-rule mapping). Time runs t = 1 -> 0 over a uniform grid: at
step i of S (inside the current block), t = 1 - i/S and s = 1 - (i+1)/S (float64). The noise schedule
(`schedule=`, `smdm.diffusion.parse_schedule`; the model's training schedule is the right one) sets the
fraction of the still-masked positions a step reveals, q_i = (alpha_s - alpha_t)/(1 - alpha_t)
(`reveal_probability`): linear 1/(S - i), and always 1 at the last step.
- `ancestral`: the exact reverse step t -> s. Each masked position is revealed with probability q_i (linear:
  (t - s)/t = 1/(S - i); all at the last step) with a token sampled from the model. A step that reveals
  nothing leaves the input unchanged, so the next step reuses the logits without a forward pass (exact
  caching). With blocks each block runs its own grid t = 1 -> 0 over its steps.
- `low_confidence` (MaskGIT / SMDM "greedy" / LLaDA): a candidate token at every masked position, confidence
  prob | margin | entropy; commit the n most confident per sequence, n = floor(m q_i) (`commit_count`; linear:
  floor(m (1 - s/t)) = m // (S - i), the integer form of the same number), everything at the last step;
  committed tokens are never re-masked.
  With `block_length` (semi-autoregressive, LLaDA): S steps split evenly over the blocks; in a block with m
  masks and s steps, step i commits floor(m/s) + [i < m mod s] (schedule-free: the schedule is not used);
  positions outside the current block have confidence -inf.
- `threshold` (Fast-dLLM parallel decoding): in the current block commit every masked position whose
  confidence is >= tau, plus always the single most confident one; the number of steps is adaptive (`steps`
  is unused; schedule-free).

Unsupervised classifier-free guidance (paper Eq. 7): the unconditional input is the same sequence with
every given (prompt) position replaced by the mask id; both rows go through ONE batched forward and the
guided logits are u + (w + 1)(c - u); w = 0 runs no extra rows.

Token choice and position choice follow docs/CONTRACTS.md "Sampler token choice" exactly: `choose_tokens`
(top-k, top-p, Gumbel-max in float32 keyed by (row seed, step, absolute position, vocab id)) and
`select_positions` (per-row top-n or threshold, ties to the lower position). Both are reached through
`_dispatch`, where a fused CUDA kernel may replace them; `SMDM_KERNELS=reference` forces these references.
Randomness: `step` in the keys is the sampler iteration (0, 1, ... across blocks, the same for every row);
the ancestral reveal coin of a position is uniform(key(seed, step, position, REVEAL_STREAM)) < q_i
(float64, `smdm.rng.uniform`), REVEAL_STREAM = 7 (the next free `smdm.rng.Stream` word).

Batch invariance (a row's tokens never depend on the other rows): every draw is keyed by the row's own seed
and absolute positions, and the forward pass is arranged so the floats of a row do not depend on the batch
layout:
- ragged rows are right-padded with `key_valid`; each row's padded length is at least its own length rounded
  up to `PAD_MULTIPLE`. Why: CPU attention reduces over keys in SIMD lanes with a scalar tail, so a row of 37
  keys alone and the same row padded to 40+ keys sum in a different order (1e-6 differences, enough to flip a
  token). Padding every row past the next lane boundary makes the extra keys exact zeros in full lanes, so any
  longer padding gives bit-identical results (tests/test_sampling.py checks this end to end).
- the prefix K/V cache and the ARM's static cache group rows of equal shape (same prompt length) and run each
  group in lockstep, so no row is ever padded or shifted for another's sake.
- every matrix product whose row count M depends on the batch gets M a multiple of `_row_multiple()`
  = 4 x torch threads. Why: MKL's sgemm computes a row with different bits in its small-M kernels (measured
  here: M = 1 is a gemv, M = 2..3 a small-M kernel, M >= 4 the blocked kernel, which gives a row the same bits
  for any M), and with T threads it splits M into per-thread chunks, so a tail chunk of 1..3 rows (e.g. rows
  8-9 of M = 10 on 2 threads) takes a small-M kernel. With M a multiple of 4T every chunk is a multiple of 4.
  So the head runs on the gathered rows padded with zero rows; the prefix-cache forwards pad their query
  chunk (extra keys masked with `key_valid`, identical shapes alone or in a batch); the ARM pads its prompt
  chunk and full-sequence forwards on the right (causal: real positions never see the pads) and its one-token
  decode batch with filler rows (copies of a real row, outputs dropped). `batch_invariant=False` turns all
  padding and fillers off (faster; the benchmark's ARM baseline uses it) at the price of last-bit
  differences between batch layouts.
GPU GEMMs may pick other kernels per shape, so on CUDA logits can still differ in the last bits.

EOS: with `eos_id`, a row stops once its first committed EOS has no masked position before it: every masked
position after it is filled with EOS as soon as it is committed, and the row leaves the batch. For `infill`
the rule covers only the trailing run of masked positions (after the last given token): text given after a hole
means the sequence goes on, whatever the hole holds.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from smdm.diffusion import Schedule, parse_schedule
from smdm.rng import Stream

PAD_MULTIPLE = 64  # padded row lengths are multiples of this (see "Batch invariance" above)
REVEAL_STREAM = Stream.GUMBEL + 1  # 4th key word of the ancestral reveal coin (next free Stream value)
CONFIDENCES = ("prob", "margin", "entropy")
CACHES = ("none", "prefix", "dual")
_CHUNK = 1 << 22  # elements of (rows x vocab) processed at once by choose_tokens
COMMIT_EPS = 1e-9  # commit_count: n = floor(m·q + COMMIT_EPS), so rounding never loses a whole token
MAX_EXACT_POWER = 64  # polynomial:P with a whole P up to this: step counts in exact integer arithmetic

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no wrapping uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    """`smdm.rng.splitmix64` on int64 tensors (two's-complement wrapping = uint64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def key_t(*words: Union[int, torch.Tensor]) -> torch.Tensor:
    """`smdm.rng.key` elementwise over tensors of words (broadcast), as int64 bits."""
    h = None
    for w in words:
        w = torch.as_tensor(_i64(w) if isinstance(w, int) else w, dtype=torch.int64)
        h = splitmix64_t(w if h is None else h ^ w)
    return h


# ------------------------------------------------------------------------------------------------------------
# Token choice and position choice (the contract a CUDA kernel reproduces token for token)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None):
    """Top-k then top-p filtering: excluded logits become -inf (float32 in, float32 out).

    top-k keeps the k largest (ties: lower id). top-p keeps the smallest prefix of the descending-sorted
    softmax whose mass reaches p: id j (in sorted order) is kept iff the mass strictly before it is < p, so
    the top token is always kept."""
    V = logits.shape[-1]
    use_k = top_k is not None and top_k < V
    use_p = top_p is not None and top_p < 1.0
    if not (use_k or use_p):
        return logits
    sorted_l, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: lower id first
    keep = torch.ones_like(sorted_l, dtype=torch.bool)
    if use_k:
        keep[..., top_k:] = False
    if use_p:
        probs = torch.softmax(sorted_l.masked_fill(~keep, -math.inf), dim=-1)
        before = torch.cumsum(probs, dim=-1)
        before = torch.cat([torch.zeros_like(before[..., :1]), before[..., :-1]], dim=-1)  # mass before j
        keep &= before < top_p
    keep_ids = torch.zeros_like(keep).scatter_(-1, order, keep)
    return logits.masked_fill(~keep_ids, -math.inf)


def choose_tokens(logits: torch.Tensor, *, seeds, positions, step, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  confidence: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """One token and its confidence per row of `logits` (N, V) (already CFG-guided), per the contract:

    1. top-k then top-p filtering (the meaning: `filter_logits`);
    2. T == 0: argmax (lowest id on ties); T > 0: argmax_v (l_v / T + g_v) over the kept ids, with the
       counter-based Gumbel noise g of (seeds[n], step, positions[n]); `positions` are absolute indices in
       the row, prompt included, so the batch layout never changes a draw;
    3. confidence of softmax(l_filtered): `prob` of the token, `margin` top1 - top2, `entropy` sum p log p.
    Returns tokens (N,) int64 and confidence (N,) float32.

    The float32 arithmetic is pinned down once, in `smdm.kernels._reference` (log/exp as fixed op sequences,
    top-p mass and softmax normaliser as exact fixed-point sums), so that the fused CUDA kernel reproduces
    this function token for token; here it is run in row chunks to bound the (rows x V) temporaries. Two
    consequence of the contract's float32 noise (u strictly inside (0, 1), g finite): an excluded id (-inf)
    is never drawn."""
    from smdm.kernels._reference import choose_tokens_reference

    if top_k is None and (top_p is None or top_p >= 1.0):  # nothing filtered: skip the reference's sort
        choose_tokens_reference = _choose_unfiltered
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    N, V = logits.shape
    dev = logits.device
    seeds, positions, step = (torch.as_tensor(x, dtype=torch.int64).to(dev).expand(N)
                              for x in (seeds, positions, step))
    rows = max(1, _CHUNK // max(V, 1))
    out = [choose_tokens_reference(logits[a:a + rows], seeds=seeds[a:a + rows],
                                   positions=positions[a:a + rows], step=step[a:a + rows],
                                   temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence)
           for a in range(0, N, rows)]
    if not out:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    return torch.cat([t for t, _ in out]), torch.cat([c for _, c in out])


def _choose_unfiltered(logits, *, seeds, positions, step, temperature, top_k, top_p, confidence):
    """`smdm.kernels._reference.choose_tokens_reference` when nothing is filtered, op for op (same primitives,
    same order), without its (N, V) sort, which only serves top-k / top-p and dominates on CPU. Bit-identical
    (tests/test_sampling.py checks it)."""
    from smdm.kernels._reference import exp_neg_f32, fixed31, gumbel_keys, gumbel_noise, log_f32

    lf = logits.to(torch.float32)
    N, V = lf.shape
    top = torch.argmax(lf, dim=1)  # lowest id on ties
    m = lf.gather(1, top[:, None])  # (N, 1)
    valid = lf != -math.inf
    z = lf - m
    e = exp_neg_f32(z)
    s_f = (fixed31(e).sum(1).to(torch.float64) * 2.0**-31).to(torch.float32)  # softmax normaliser
    t32 = float(np.float32(temperature))
    if t32 > 0.0:
        t = torch.full((1, 1), t32, dtype=torch.float32, device=lf.device)
        keys = gumbel_keys(seeds, step, positions)
        # a NaN logit is never drawn here (as in the reference's filtered path); at T = 0 argmax takes it
        drawable = valid & ~torch.isnan(lf)
        score = torch.where(drawable, lf / t + gumbel_noise(keys, V), -math.inf)
        # no drawable score (only NaN / -inf logits, or every l/T overflowing to -inf): the argmax `top`,
        # as the reference and the kernel do (argmax of an all -inf row would be id 0)
        tok = torch.where(score.max(dim=1).values == -math.inf, top, torch.argmax(score, dim=1))
    else:
        tok = top
    if confidence == "prob":
        return tok, exp_neg_f32(lf.gather(1, tok[:, None]).squeeze(1) - m.squeeze(1)) / s_f
    if confidence == "margin":
        l2 = lf.scatter(1, top[:, None], -math.inf).max(dim=1).values
        e2 = torch.where(l2 == -math.inf, 0.0, exp_neg_f32(l2 - m.squeeze(1)))
        return tok, (1.0 - e2) / s_f
    a_fix = torch.where(valid, fixed31(-(e * torch.where(valid, z, 0.0))), 0).sum(1)
    a_f = (-(a_fix.to(torch.float64) * 2.0**-31)).to(torch.float32)
    return tok, a_f / s_f - log_f32(s_f)


def choose_tokens_cpu(logits: torch.Tensor, *, seeds, positions, step, temperature: float = 0.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      confidence: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """`choose_tokens` for CPU tensors through the Rust core (`smdm._core.choose_tokens`, rust/src/sampler.rs):
    the same tokens and confidences bit for bit (tests/test_sampling.py), top-k / top-p included, in one pass
    over each row (plus a sort of the row when filtering) with the rows in parallel, where the reference runs
    some sixty whole-tensor ops over (rows x V) int64 and float32 temporaries for the counter-based Gumbel
    noise."""
    from smdm import _core

    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    N = logits.shape[0]
    seeds, positions, step = (torch.as_tensor(x, dtype=torch.int64).expand(N).contiguous().numpy()
                              for x in (seeds, positions, step))
    lf = logits.detach().to(torch.float32).contiguous().numpy()
    tok, conf = _core.choose_tokens(lf, seeds, step, positions, float(temperature), confidence,
                                    top_k=min(int(top_k or 0), lf.shape[1]),  # k >= V keeps every id
                                    top_p=1.0 if top_p is None else float(top_p))
    return torch.from_numpy(tok), torch.from_numpy(conf)


def _rust_sampler() -> bool:
    """Whether the Rust core with `choose_tokens` imports (a checkout without the built extension, as on the
    GPU machines, runs the reference)."""
    try:
        from smdm import _core
    except ImportError:
        return False
    return hasattr(_core, "choose_tokens")


def select_positions(confidence: torch.Tensor, candidates: torch.Tensor, n: Optional[torch.Tensor] = None,
                     threshold: Optional[float] = None) -> torch.Tensor:
    """Which candidate positions to commit, per row. confidence (B, P) float32, candidates (B, P) bool with
    columns in increasing position order. Count mode: the n[b] most confident candidates (ties: lower position
    first; n clipped to the candidates). Threshold mode: every candidate with confidence >= threshold plus
    always the single most confident one. Returns (B, P) bool."""
    B, P = confidence.shape
    # lexicographic order: candidates first, then confidence descending, then lower position (stable sorts)
    keyed = confidence.masked_fill(~candidates, -math.inf)
    order = torch.sort(keyed, dim=-1, descending=True, stable=True)[1]
    order = order.gather(-1, torch.sort(candidates.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                        stable=True)[1])
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(P, device=order.device).expand(B, P))
    if threshold is None:
        if n is None:
            raise ValueError("select_positions needs n (count mode) or threshold")
        commit = rank < torch.as_tensor(n, device=rank.device).reshape(B, 1)
    else:
        commit = (confidence >= threshold) | (rank == 0)
    return commit & candidates


def _dispatch(name: str, device: torch.device) -> Callable:
    """The implementation of `choose_tokens` / `select_positions`: the reference unless a fused kernel
    (`smdm.kernels.<name>`, same signature) is available for the device; on the CPU, `choose_tokens_cpu` (Rust,
    bit-identical). SMDM_KERNELS=reference forces the PyTorch reference; SMDM_KERNELS=cuda demands the kernel
    (an error if it is missing, never a silent fallback)."""
    mode = os.environ.get("SMDM_KERNELS", "auto")
    ref = {"choose_tokens": choose_tokens, "select_positions": select_positions}[name]
    if mode == "auto" and device.type == "cpu" and name == "choose_tokens" and _rust_sampler():
        return choose_tokens_cpu  # the Rust row pass, bit-identical to the reference
    if mode == "reference" or (mode == "auto" and device.type != "cuda"):
        return ref
    try:
        from smdm import kernels  # optional; built on first use
        fn = getattr(kernels, name, None)
    except ImportError as e:
        if mode == "cuda":
            raise RuntimeError(f"SMDM_KERNELS=cuda but smdm.kernels cannot be imported: {e}") from e
        fn = None
    if fn is None and mode == "cuda":
        raise RuntimeError(f"SMDM_KERNELS=cuda but smdm.kernels has no {name}")
    return fn or ref


# ------------------------------------------------------------------------------------------------------------
# Samplers: a commit rule each. Inputs per active row b: confidence/candidates (B, P) over the current block's
# masked positions, the row states; output: (B, P) bool, the positions committed at this step.


@dataclass
class _Row:
    """Per-sequence sampler state (every row runs its own schedule; the batch only shares forward passes)."""

    index: int  # position in the caller's list
    seq: torch.Tensor  # (L,) current ids, mask id where still masked
    given: torch.Tensor  # (L,) bool: positions given by the caller (the prompt); CFG masks these
    blocks: list  # LongTensors of initially-masked positions, one per block, in position order
    block_steps: list  # steps of each block (count samplers)
    seed: int
    window: Optional[tuple] = None  # (start, end): the region whose EOS rule applies
    b: int = 0  # current block
    i: int = 0  # step inside the block
    m_block: int = 0  # masks in the block when it started (LLaDA quota)
    logits: Optional[torch.Tensor] = None  # (P, V) guided logits of the candidates (reused when not dirty)
    cand: Optional[torch.Tensor] = None  # (P,) candidate positions the logits belong to
    state: Optional[tuple] = None  # (masks left, block) when the logits were computed
    stash: dict = field(default_factory=dict)  # block K/V caches per CFG branch: {branch: (block, k, v)}
    stale: bool = False  # an EOS fill changed positions after the current block (the dual cache's kept suffix)
    since_full: int = 0  # block-cache forwards since the kept K/V were rebuilt (cache_refresh)
    forwards: int = 0
    steps: int = 0
    done: bool = False


def _integer_power(schedule: Schedule) -> Optional[int]:
    """P of "polynomial:P" when P is a whole number up to MAX_EXACT_POWER (exact integer step counts)."""
    if schedule.kind == "polynomial" and schedule.power.is_integer() and schedule.power <= MAX_EXACT_POWER:
        return int(schedule.power)
    return None


def reveal_probability(schedule: Schedule, i: int, S: int) -> float:
    """The fraction of the still-masked positions that step i of S reveals, from t = 1 - i/S to
    s = 1 - (i+1)/S: q = (alpha_s - alpha_t)/(1 - alpha_t). With k = S - i steps left, in float64:
      last step (k <= 1)      1.0
      linear                  1.0 / k                                 (= (t - s)/t, as always)
      cosine                  sin((2k-1)a)·sin(a) / sin(ka)^2, a = pi/(4S)  (cos A - cos B as a product of
                              sines: no cancellation, a few ulps of relative error)
      polynomial:P, whole P   float(Fraction(k^P - (k-1)^P, k^P))   (= 1 - ((k-1)/k)^P, correctly rounded)
      polynomial:P, other P   -expm1(P·log1p(-1/k))                 (the same number, relative error ~ulps)
    """
    k = S - i
    if k <= 1:
        return 1.0
    if schedule.kind == "linear":
        return 1.0 / k
    if schedule.kind == "cosine":
        a = math.pi / (4 * S)
        return math.sin((2 * k - 1) * a) * math.sin(a) / math.sin(k * a) ** 2
    power = _integer_power(schedule)
    if power is not None:
        return float(Fraction(k**power - (k - 1) ** power, k**power))
    return -math.expm1(schedule.power * math.log1p(-1.0 / k))


def commit_count(m: int, schedule: Schedule, i: int, S: int) -> int:
    """Positions the low-confidence sampler commits at step i of S with m still masked: floor(m·q) with q of
    `reveal_probability`, everything at the last step. Deterministic by construction:
      linear                  m // k                       (integer arithmetic, k = S - i, as always)
      polynomial:P, whole P   m·(k^P - (k-1)^P) // k^P     (exact integers)
      cosine, other P         min(m, floor(m·q + COMMIT_EPS)) in float64: q is within a few ulps (relative)
                              of the real number, so for m < 10^6 the product is off by < 10^-9 and a
                              product that is a whole number in exact arithmetic (cosine with S = 3, i = 0
                              has q = 1/2) is never floored to one less; only a real value within 10^-9
                              below a whole number is rounded up."""
    k = S - i
    if k <= 1:
        return m
    if schedule.kind == "linear":
        return m // k
    power = _integer_power(schedule)
    if power is not None:
        return m * (k**power - (k - 1) ** power) // k**power
    return min(m, math.floor(m * reveal_probability(schedule, i, S) + COMMIT_EPS))


def _commit_ancestral(conf, cand, rows, step, opts):
    """Exact reverse step: reveal each masked position with probability q_i (linear: 1/(S - i) = (t - s)/t)."""
    B, P = cand.shape
    p_reveal = torch.tensor([reveal_probability(opts["schedule"], r.i, r.block_steps[r.b]) for r in rows],
                            dtype=torch.float64)
    coins = torch.stack([_reveal_uniform(r, step, P) for r in rows])  # (B, P) float64
    return cand & (coins < p_reveal[:, None].to(coins.device))


def _reveal_uniform(row: _Row, step: int, P: int) -> torch.Tensor:
    """uniform(key(seed, step, position, REVEAL)) for the row's current candidate columns (padded to P)."""
    u = torch.ones(P, dtype=torch.float64, device=row.seq.device)
    pos = row.cand
    h = key_t(row.seed, step, pos.cpu(), REVEAL_STREAM)
    u[:len(pos)] = (_srl(h, 11).to(torch.float64) * 2.0 ** -53).to(u.device)
    return u


def _commit_low_confidence(conf, cand, rows, step, opts):
    """Commit the most confident positions per row: `commit_count` without blocks (linear: m // (S - i) =
    floor(m (1 - s/t)) on the uniform grid), the LLaDA quota floor(m/s) + [i < m mod s] inside blocks
    (schedule-free)."""
    n = []
    for r in rows:
        s = r.block_steps[r.b]
        if opts["block_length"] is None:
            n.append(commit_count(int(cand[len(n)].sum()), opts["schedule"], r.i, s))
        else:
            n.append(r.m_block // s + (1 if r.i < r.m_block % s else 0))
    n = torch.tensor(n, dtype=torch.int64, device=conf.device)
    return _dispatch("select_positions", conf.device)(conf, cand, n=n) | (cand & _last_step(rows, cand))


def _last_step(rows, cand) -> torch.Tensor:
    """(B, 1) bool: the row is at the last step of its block, where everything left is committed."""
    last = [r.i >= r.block_steps[r.b] - 1 for r in rows]
    return torch.tensor(last, dtype=torch.bool, device=cand.device)[:, None]


def _commit_threshold(conf, cand, rows, step, opts):
    """Fast-dLLM: every candidate with confidence >= tau, plus always the most confident one."""
    commit = _dispatch("select_positions", conf.device)(conf, cand, threshold=opts["threshold"])
    stuck = ~commit.any(1) & cand.any(1)  # only if every confidence is -inf: commit the first candidate
    if bool(stuck.any()):
        first = torch.zeros_like(cand).scatter_(1, cand.int().argmax(1, keepdim=True), True)
        commit |= first & stuck[:, None]
    return commit


SAMPLERS = {"ancestral": _commit_ancestral, "low_confidence": _commit_low_confidence,
            "threshold": _commit_threshold}


# ------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class GenerationOutput:
    tokens: list  # generate: generated ids per prompt (no prompt, cut before the first EOS); infill: filled
    sequences: list  # full rows: prompt + generation (tail after the first EOS filled with EOS)
    forward_passes: int  # model calls (a CFG pair counts once: both rows run in one batched call)
    row_forward_passes: list  # forward passes each row took part in
    steps: list  # sampler steps each row ran
    generated_tokens: int  # tokens the sampler produced: len(tokens) per row (+1 for a final EOS)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(1, self.forward_passes)


# ------------------------------------------------------------------------------------------------------------
# Public API


def generate(model, prompts: Sequence[Sequence[int]], gen_length: int = 128, steps: int = 128,
             sampler: str = "low_confidence", block_length: Optional[int] = None,
             threshold: Optional[float] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, cfg_scale: float = 0.0, seed: Union[int, Sequence[int]] = 0,
             confidence: str = "prob", eos_id: Optional[int] = None, cache: Optional[str] = None,
             batch_invariant: bool = True, callback: Optional[Callable] = None,
             schedule: Union[str, Schedule, None] = None, cache_refresh: Optional[int] = None) -> GenerationOutput:
    """Generate `gen_length` tokens after each prompt (token-id lists of any lengths).

    MDM (model.config.causal False): `sampler` in SAMPLERS, `steps` sampler steps (split evenly over blocks of
    `block_length`), `threshold` for sampler="threshold", `cfg_scale` w of Eq. 7, `confidence` prob | margin |
    entropy, `cache` "none" | "prefix" (K/V of the prompt and finished blocks reused) | "dual" (also the K/V
    after the current block: each step runs the block alone); both caches are approximate. `cache_refresh` N
    (prefix / dual): rebuild the kept K/V every N forward passes inside a block, not only at its first
    (None: Fast-dLLM's once per block; 1: every pass, the uncached logits).
    ARM twin (causal True): left-to-right decoding with the same token choice; `cache="prefix"` is the static
    KV cache (exact, the default for the ARM; the MDM's default is "none"); `steps`, `sampler`, `block_length`,
    `threshold`, `cfg_scale`, `confidence` do not apply.
    `seed`: an int (every row) or one per prompt. `eos_id`: per-row early stop. `batch_invariant`: arrange
    the forward passes so a row's floats never depend on the other rows (module docstring; False is a little
    faster). `callback(step, seqs)` sees copies of the rows (mask id where still masked) after each step.
    `schedule`: the noise schedule of the reverse steps ("linear" | "cosine" | "polynomial:P"; default: the one
    the model was trained with, `model.train_schedule` as `smdm.load` sets it, else linear): sets how many
    positions `ancestral` and `low_confidence` (without blocks) reveal per step; the block quota and
    `threshold` do not use it, nor does the ARM twin."""
    cfg = model.config
    schedule = _schedule(model, schedule)
    if cache is None:  # the ARM's KV cache is exact, the MDM's prefix cache an approximation
        cache = "prefix" if cfg.causal else "none"
    if isinstance(prompts, (str, bytes)) or hasattr(prompts, "ids") and not isinstance(prompts, torch.Tensor):
        raise ValueError("prompts must be a list of token-id lists: one prompt is [tokenizer.encode(text).ids]")
    if len(prompts) and (isinstance(prompts[0], (int, np.integer))
                         or isinstance(prompts[0], torch.Tensor) and prompts[0].dim() == 0):  # a 1-D tensor
        raise ValueError("prompts must be a list of token-id lists (one prompt: [ids])")
    prompts = [token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    seeds = _seeds(seed, len(prompts))
    top_k = _check_common(cfg, temperature, top_k, top_p, cache, eos_id, cache_refresh)
    gen_length = _count(gen_length, "gen_length")
    for i, p in enumerate(prompts):
        _check_ids(cfg, p, f"prompt {i}")
        if len(p) + gen_length > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens: with gen_length={gen_length} that is "
                             f"{len(p) + gen_length} > the model's context of {cfg.max_seq_len}")
    if cfg.causal:
        if cache == "dual":
            raise ValueError("cache='dual' applies to the MDM only (the ARM twin's KV cache is cache='prefix')")
        if cfg_scale:
            raise ValueError("cfg_scale applies to the MDM only (the ARM twin has no mask token)")
        if sampler not in SAMPLERS:  # unused by the ARM, still validated (as the schedule is)
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        return _generate_arm(model, prompts, gen_length, seeds, dict(temperature=temperature, top_k=top_k,
                             top_p=top_p, batch_invariant=batch_invariant), eos_id, cache, callback)
    steps, block_length = _count(steps, "steps"), _count(block_length, "block_length", none_ok=True)
    check_mdm_options(gen_length, steps, sampler=sampler, block_length=block_length, threshold=threshold,
                      cfg_scale=cfg_scale, confidence=confidence)
    mask_id = cfg.mask_id
    rows = []
    for i, p in enumerate(prompts):
        seq = torch.tensor(p + [mask_id] * gen_length, dtype=torch.int64)
        masked = torch.arange(len(p), len(p) + gen_length)
        rows.append(_make_row(i, seq, masked, steps, block_length, seeds[i], (len(p), len(p) + gen_length)))
    out = _denoise(model, rows, sampler, dict(block_length=block_length, threshold=threshold,
                                              temperature=temperature, top_k=top_k, top_p=top_p,
                                              cfg_scale=cfg_scale, confidence=confidence, eos_id=eos_id,
                                              cache=cache, batch_invariant=batch_invariant,
                                              schedule=schedule, cache_refresh=cache_refresh), callback)
    tokens = [_cut(r.seq[len(p):].tolist(), eos_id) for r, p in zip(rows, prompts)]
    return _output(rows, out, tokens, eos_id, [len(p) for p in prompts])


def infill(model, ids: Sequence, mask_positions: Optional[Sequence] = None, steps: Optional[int] = None,
           sampler: str = "low_confidence", block_length: Optional[int] = None,
           threshold: Optional[float] = None, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, cfg_scale: float = 0.0, seed: Union[int, Sequence[int]] = 0,
           confidence: str = "prob", eos_id: Optional[int] = None, cache: Optional[str] = None,
           batch_invariant: bool = True, callback: Optional[Callable] = None,
           schedule: Union[str, Schedule, None] = None, cache_refresh: Optional[int] = None) -> GenerationOutput:
    """Fill any set of masked positions of each sequence (MDM only); everything else is kept as given.

    ids: a list of token-id lists (or one list). mask_positions: per sequence the positions to generate (or
    one list for one sequence); None = the positions where ids equal the model's mask id. steps: per sequence,
    default its number of masked positions (one step per position in every block). Blocks (block_length) are
    runs of that many masked positions in position order; given steps are split over them as evenly as
    possible. `tokens` of the output are the filled
    sequences; CFG masks every given position for the unconditional row. Other options (`schedule` too) as
    in `generate`."""
    cfg = model.config
    schedule = _schedule(model, schedule)
    if cfg.causal:
        raise ValueError("infill needs the MDM (model.config.causal is True: the ARM twin cannot infill)")
    if isinstance(ids, (str, bytes)):
        raise ValueError("ids is text: pass token ids (the mask id at the positions to fill)")
    if hasattr(ids, "ids") and not isinstance(ids, (torch.Tensor, np.ndarray)):  # one tokenizers.Encoding
        ids = ids.ids
    first = ids[0] if len(ids) > 0 else None
    single = first is not None and _scalar(first)  # a flat list, or a 1-D array whose items are 0-d
    ids = [token_ids(ids, "ids")] if single else [token_ids(x, f"sequence {i}") for i, x in enumerate(ids)]
    if mask_positions is not None and single:
        mask_positions = [mask_positions]
    elif mask_positions is not None and any(_scalar(m) for m in mask_positions):
        raise ValueError(f"mask_positions holds a position where a list is expected: give one list of positions "
                         f"per sequence ({len(ids)} sequences)")
    if mask_positions is not None:
        mask_positions = [token_ids(m, f"mask_positions[{i}]", "positions") for i, m in enumerate(mask_positions)]
    steps = None if steps is None else _count(steps, "steps")
    block_length = _count(block_length, "block_length", none_ok=True)
    if not ids:
        raise ValueError("ids is empty")
    seeds = _seeds(seed, len(ids))
    cache = "none" if cache is None else cache
    top_k = _check_common(cfg, temperature, top_k, top_p, cache, eos_id, cache_refresh)
    _check_mdm(sampler, 1 if steps is None else steps, block_length, threshold, cfg_scale, confidence)
    if mask_positions is not None and len(mask_positions) != len(ids):
        raise ValueError(f"mask_positions has {len(mask_positions)} entries for {len(ids)} sequences")
    rows = []
    for i, x in enumerate(ids):
        if len(x) > cfg.max_seq_len:
            raise ValueError(f"sequence {i} has {len(x)} tokens > the model's context of {cfg.max_seq_len}")
        big = [t for t in x if not -2**63 <= t < 2**63]  # any value may stand at a mask position, not these
        if big:
            raise ValueError(f"sequence {i} holds token id {big[0]} outside [0, {cfg.vocab_size}) (the mask id "
                             f"{cfg.vocab_size} marks positions to generate)")
        seq = torch.tensor(x, dtype=torch.int64)
        if mask_positions is None:
            masked = torch.nonzero(seq == cfg.mask_id)[:, 0]
        else:
            masked = torch.tensor(sorted(set(int(j) for j in mask_positions[i])), dtype=torch.int64)
            if len(masked) and (masked[0] < 0 or masked[-1] >= len(x)):
                raise ValueError(f"mask position out of range for sequence {i} of length {len(x)}")
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[masked] = False
        _check_ids(cfg, seq[keep].tolist(), f"sequence {i} (outside its mask positions)")
        seq[masked] = cfg.mask_id
        # the EOS rule applies to the trailing run of masked positions only (after the last given token, as
        # in `generate`): an EOS inside a hole with given text after it (or a given EOS) ends nothing
        given_at = torch.nonzero(keep)[:, 0]
        lo = int(given_at[-1]) + 1 if len(given_at) else 0
        window = (lo, len(x)) if lo < len(x) else None
        rows.append(_make_row(i, seq, masked, None if steps is None else max(1, steps), block_length, seeds[i],
                              window))
    if not any(bool((r.seq == cfg.mask_id).any()) for r in rows):  # as `smdm infill`: a forgotten mark
        raise ValueError(f"nothing to fill: no sequence has a masked position (put the mask id {cfg.mask_id} "
                         f"at the positions to fill, or give mask_positions)")
    out = _denoise(model, rows, sampler, dict(block_length=block_length, threshold=threshold,
                                              temperature=temperature, top_k=top_k, top_p=top_p,
                                              cfg_scale=cfg_scale, confidence=confidence, eos_id=eos_id,
                                              cache=cache, batch_invariant=batch_invariant,
                                              schedule=schedule, cache_refresh=cache_refresh), callback)
    tokens = [r.seq.tolist() for r in rows]
    return GenerationOutput(tokens=tokens, sequences=tokens, forward_passes=out,
                            row_forward_passes=[r.forwards for r in rows], steps=[r.steps for r in rows],
                            generated_tokens=sum(_generated_count(r, eos_id) for r in rows))


# ------------------------------------------------------------------------------------------------------------
# Validation helpers


def _schedule(model, schedule) -> Schedule:
    """`schedule`, else the one the model was trained with (`smdm.load` sets `model.train_schedule` from the
    checkpoint's config, as `smdm generate` reads it), else linear."""
    if schedule is None and getattr(model, "train_schedule", None):
        try:
            return parse_schedule(model.train_schedule)
        except ValueError as e:
            raise ValueError(f"the checkpoint's config.json train.schedule: {e} (pass schedule=...)") from None
    return parse_schedule("linear" if schedule is None else schedule)


def token_ids(seq, what: str, kind: str = "token ids") -> list:
    """One sequence of token ids (or other integers: `kind` names them in errors, e.g. "positions") as a list
    of Python ints: a list or tuple of ints (numpy and 0-d tensor ints too), a 1-D integer numpy array or
    tensor, or a `tokenizers.Encoding` (its .ids). Text, floats and bools are ValueErrors naming `what` (int()
    would read '7' from text and truncate 1.7 silently)."""
    if isinstance(seq, (str, bytes, bytearray, memoryview)):
        hint = ", e.g. tokenizer.encode(text).ids" if kind == "token ids" else ""
        raise ValueError(f"{what} is text ({bytes(seq[:30]) if not isinstance(seq, str) else seq[:30]!r}): pass "
                         f"{kind}{hint}")
    if isinstance(seq, (set, frozenset, dict)):
        raise ValueError(f"{what} is a {type(seq).__name__}, which has no order: pass a list of {kind}")
    if hasattr(seq, "ids") and not isinstance(seq, (torch.Tensor, np.ndarray)):  # a tokenizers.Encoding
        seq = seq.ids
    if isinstance(seq, np.ndarray) and seq.dtype == object and seq.ndim == 1:
        seq = list(seq)  # element by element, below
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        integer = (seq.dtype not in (torch.bool,) and not seq.is_floating_point() and not seq.is_complex()
                   if isinstance(seq, torch.Tensor) else seq.dtype.kind in "iu")
        if seq.ndim == 1 and seq.shape[0] == 0:  # torch.tensor([]) / np.array([]): float dtype, no ids
            return []
        if seq.ndim != 1 or not integer:
            raise ValueError(f"{what} must be a 1-D integer array of {kind}, got {seq.dtype} of shape "
                             f"{tuple(seq.shape)}")
        return seq.tolist()
    try:
        items = list(seq)
    except TypeError:
        raise ValueError(f"{what} is not a sequence of {kind}: {seq!r}") from None
    out = []
    for x in items:
        try:
            if isinstance(x, bool):
                raise TypeError
            out.append(operator.index(x))
        except TypeError:
            raise ValueError(f"{what} holds {x!r}: {kind} are ints") from None
    return out


def _scalar(x) -> bool:
    """A single number (int, numpy scalar, 0-d array or tensor), not a sequence of them."""
    return isinstance(x, (numbers.Number, np.generic)) or isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0


def _count(x, what: str, none_ok: bool = False):
    """An int >= 1 option (numpy integers too) as a Python int; None where allowed."""
    if x is None and none_ok:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{what} must be an int >= 1{' (or None)' if none_ok else ''}, got {x!r}")
    return int(x)


def _seeds(seed, n: int) -> list:
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):  # numpy integers too
        return [int(seed)] * n
    try:
        seeds = [operator.index(s) for s in seed]
        if any(isinstance(s, bool) for s in seed):
            raise TypeError
    except TypeError:
        raise ValueError(f"seed must be an int or a list of ints, one per prompt; got {seed!r}") from None
    if len(seeds) != n:
        raise ValueError(f"seed is a list of {len(seeds)} for {n} prompts (pass an int or one per prompt)")
    return seeds


def _check_common(cfg, temperature, top_k, top_p, cache, eos_id, cache_refresh=None) -> Optional[int]:
    """Checks the options `generate` and `infill` share; returns top_k as the samplers take it: at most
    vocab_size + 1 (any k at least a logits row's width keeps every id, and a huge int fits no C long)."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    top_k = _count(top_k, "top_k", none_ok=True)
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    _check_refresh(cache_refresh, cache, cfg.causal)
    if eos_id is not None and not (0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id={eos_id} is not a token id of the model (vocab_size {cfg.vocab_size})")
    return None if top_k is None else min(int(top_k), cfg.vocab_size + 1)


def _check_refresh(cache_refresh, cache, causal: bool) -> None:
    if cache_refresh is not None:
        _count(cache_refresh, "cache_refresh", none_ok=True)
        if causal or cache == "none":
            raise ValueError("cache_refresh applies to the MDM's block caches (cache='prefix' or 'dual') only")


def _check_mdm(sampler, steps, block_length, threshold, cfg_scale, confidence):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    _count(steps, "steps")
    _count(block_length, "block_length", none_ok=True)
    if (sampler == "threshold") != (threshold is not None):
        raise ValueError("threshold is required by sampler='threshold' and used by no other sampler")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if not (cfg_scale >= 0 and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be finite and >= 0 (0 = no guidance), got {cfg_scale}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")


def check_mdm_options(gen_length: int, steps: int, *, sampler: str = "low_confidence",
                      block_length: Optional[int] = None, threshold: Optional[float] = None,
                      cfg_scale: float = 0.0, confidence: str = "prob", cache: str = "none",
                      cache_refresh: Optional[int] = None) -> None:
    """The checks `generate` makes of an MDM's sampler options, without a model: a benchmark checks every variant
    before the first one runs. Raises ValueError naming the option."""
    _check_mdm(sampler, steps, block_length, threshold, cfg_scale, confidence)
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    _check_refresh(cache_refresh, cache, False)
    if block_length is not None:
        if gen_length % block_length:
            raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
        n_blocks = gen_length // block_length
        if sampler != "threshold" and steps % n_blocks:
            raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                             f"(gen_length / block_length = {n_blocks})")


def _check_ids(cfg, ids, what):
    for t in ids:
        if not (0 <= t < cfg.vocab_size):
            raise ValueError(f"{what} holds token id {t} outside [0, {cfg.vocab_size}) (the mask id "
                             f"{cfg.vocab_size} marks positions to generate, never given text)")


def _cut(ids: list, eos_id: Optional[int]) -> list:
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def _output(rows, forwards, tokens, eos_id, prompt_lens):
    seqs = [r.seq.tolist() for r in rows]
    if eos_id is not None:  # the tail after the first EOS is EOS (positions committed before that EOS included)
        seqs = [s[:p] + t + [eos_id] * (len(s) - p - len(t)) for s, t, p in zip(seqs, tokens, prompt_lens)]
    gen = sum(len(t) + (1 if eos_id is not None and len(t) < len(s) - p else 0)
              for t, s, p in zip(tokens, seqs, prompt_lens))
    return GenerationOutput(tokens=tokens, sequences=seqs, forward_passes=forwards,
                            row_forward_passes=[r.forwards for r in rows], steps=[r.steps for r in rows],
                            generated_tokens=gen)


def _generated_count(r: _Row, eos_id: Optional[int]) -> int:
    """Tokens the sampler generated in row r: its masked positions, but in the EOS window only those up to
    and including the first EOS (the rest is EOS fill), as `generate` counts them."""
    n = sum(len(b) for b in r.blocks)
    if eos_id is None or r.window is None:
        return n
    lo, hi = r.window
    eos = torch.nonzero(r.seq[lo:hi] == eos_id)
    return n - (hi - lo) + (int(eos[0, 0]) + 1 if len(eos) else hi - lo)


def _make_row(index, seq, masked, steps, block_length, seed, window) -> _Row:
    """Blocks are runs of `block_length` initially-masked positions (the whole set without blocks); S steps
    are split over them as evenly as possible (exactly evenly when the caller checked divisibility); S = None
    gives every block one step per position."""
    masked = masked.to(torch.int64)
    if block_length is None or len(masked) == 0:
        blocks = [masked]
    else:
        blocks = list(torch.split(masked, block_length))
    nb = len(blocks)
    if steps is None:
        block_steps = [max(1, len(b)) for b in blocks]
    else:
        block_steps = [max(1, steps // nb + (1 if k < steps % nb else 0)) for k in range(nb)]
    row = _Row(index=index, seq=seq, given=torch.ones_like(seq, dtype=torch.bool), blocks=blocks,
               block_steps=block_steps, seed=seed, window=window)
    row.given[masked] = False
    row.m_block = len(blocks[0])
    if len(masked) == 0:
        row.done = True
    return row


# ------------------------------------------------------------------------------------------------------------
# The MDM reverse process


def _denoise(model, rows: list, sampler: str, opts: dict, callback) -> int:
    """Run every row's schedule to the end; returns the number of model calls. Rows advance one step per
    iteration (so the step index of the RNG key is the iteration), leave the batch when done, and take part in
    a forward pass only when their input changed since their last one (exact logit reuse)."""
    device = next(model.parameters()).device
    mask_id = model.config.mask_id
    for r in rows:
        r.seq, r.given = r.seq.to(device), r.given.to(device)
        r.blocks = [b.to(device) for b in r.blocks]
    commit_rule = SAMPLERS[sampler]
    choose = _dispatch("choose_tokens", device)
    forwards = 0
    step = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while True:
                active = [r for r in rows if not r.done]
                if not active:
                    break
                for r in active:  # candidates: masked positions of the current block
                    state = (int((r.seq == mask_id).sum()), r.b)  # masks only ever decrease
                    if state != r.state:  # the input changed: new logits (else exact reuse)
                        r.logits, r.state = None, state
                        r.cand = r.blocks[r.b][r.seq[r.blocks[r.b]] == mask_id]
                need = [r for r in active if r.logits is None]
                if need:
                    forwards += _forward_mdm(model, need, opts)
                P = max(len(r.cand) for r in active)
                conf_m = torch.full((len(active), P), -math.inf, device=device)
                cand_m = torch.zeros((len(active), P), dtype=torch.bool, device=device)
                tok_m = torch.zeros((len(active), P), dtype=torch.int64, device=device)
                for b, r in enumerate(active):
                    cand_m[b, :len(r.cand)] = True
                # Ancestral reveal coins look at neither tokens nor confidences: draw them first and choose
                # tokens only at the revealed positions (a token depends on its own row, seed, step and
                # position alone, so the result is the same; the sampler work drops from every masked
                # position per step to the revealed ones). The other rules rank by confidence: every row.
                commit = commit_rule(None, cand_m, active, step, opts) if sampler == "ancestral" else None
                pick = [commit[b, :len(r.cand)] if commit is not None else slice(None)
                        for b, r in enumerate(active)]
                cands = [r.cand[k] for r, k in zip(active, pick)]
                seeds = torch.cat([torch.full((len(c),), _i64(r.seed)) for r, c in zip(active, cands)])
                tok, conf = choose(torch.cat([r.logits[k] for r, k in zip(active, pick)]), seeds=seeds,
                                   positions=torch.cat(cands), step=step,
                                   temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                                   confidence=opts["confidence"])
                a = 0
                for b, (r, k, c) in enumerate(zip(active, pick, cands)):
                    n = len(c)
                    tok_m[b, :len(r.cand)][k], conf_m[b, :len(r.cand)][k] = tok[a:a + n], conf[a:a + n]
                    a += n
                if commit is None:
                    commit = commit_rule(conf_m, cand_m, active, step, opts)
                for b, r in enumerate(active):
                    n = len(r.cand)
                    sel = commit[b, :n]
                    if bool(sel.any()):
                        r.seq[r.cand[sel]] = tok_m[b, :n][sel]
                    _after_step(r, mask_id, opts["eos_id"])
                step += 1
                if callback is not None:
                    callback(step, [r.seq.clone() for r in rows])  # copies: the rows change in the next step
    finally:
        model.train(was_training)
    return forwards


def _after_step(r: _Row, mask_id: int, eos_id: Optional[int]):
    """EOS fill, block/step bookkeeping, done flag."""
    r.steps += 1
    r.i += 1
    if eos_id is not None and r.window is not None:
        lo, hi = r.window
        region = r.seq[lo:hi]
        eos = torch.nonzero(region == eos_id)
        if len(eos):  # everything after the first committed EOS is settled: EOS
            first = int(eos[0, 0])
            tail = region[first + 1:]
            fill = tail == mask_id
            tail[fill] = eos_id
            after_block = int(r.blocks[r.b][-1]) + 1 - (lo + first + 1)  # tail index where the suffix starts
            r.stale = r.stale or bool(fill[max(after_block, 0):].any())
    while r.b < len(r.blocks) and not bool((r.seq[r.blocks[r.b]] == mask_id).any()):
        r.b += 1
        r.i = 0
        if r.b < len(r.blocks):
            r.m_block = int((r.seq[r.blocks[r.b]] == mask_id).sum())
    if r.b == len(r.blocks):
        r.done = True
        r.logits = r.cand = None
        r.stash.clear()


def guided_logits(c: torch.Tensor, u: Optional[torch.Tensor], w: float) -> torch.Tensor:
    """Unsupervised CFG, paper Eq. 7: u + (w + 1)(c - u), in float32 (u None: c itself, in float32)."""
    c = c.float()
    if u is None:
        return c
    u = u.float()
    return u + (w + 1.0) * (c - u)


def _branches(r: _Row, mask_id: int, cfg: bool):
    """The model inputs of a row: conditional, plus the unconditional one (given positions masked) for CFG."""
    out = [r.seq]
    if cfg:
        out.append(r.seq.masked_fill(r.given, mask_id))
    return out


def _forward_mdm(model, rows: list, opts: dict) -> int:
    """Guided logits at each row's candidate positions; returns the number of model calls."""
    cfg_on = opts["cfg_scale"] > 0
    if opts["cache"] in ("prefix", "dual"):
        return _forward_block_cache(model, rows, opts)
    mask_id = model.config.mask_id
    inputs = [x for r in rows for x in _branches(r, mask_id, cfg_on)]  # (row, branch) order
    Lpad = max(_round_up(len(x), _len_multiple(opts)) for x in inputs)
    x, valid, positions = _padded(inputs, Lpad, model.config.max_seq_len - 1)  # pads: any position
    h = model.hidden(x, key_valid=valid, positions=positions)  # (Bf, Lpad, d)
    nb = 2 if cfg_on else 1
    picked = torch.cat([h[j * nb + k, r.cand] for j, r in enumerate(rows) for k in range(nb)])
    logits = _head(model, picked, opts)  # (sum P * nb, V)
    a = 0
    for r in rows:
        n = len(r.cand)
        c = logits[a:a + n]
        u = logits[a + n:a + 2 * n] if cfg_on else None
        r.logits = guided_logits(c, u, opts["cfg_scale"])
        a += nb * n
        r.forwards += 1
    return 1


def _row_multiple(opts: dict) -> int:
    """Batch-dependent GEMM row counts are padded to a multiple of this (module docstring)."""
    return 4 * torch.get_num_threads() if opts["batch_invariant"] else 1


def _len_multiple(opts: dict) -> int:
    """Padded sequence lengths are multiples of this (lane-aligned keys, and M = rows x length aligned)."""
    return math.lcm(PAD_MULTIPLE, _row_multiple(opts)) if opts["batch_invariant"] else 1


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _head(model, h: torch.Tensor, opts: dict) -> torch.Tensor:
    """The output head on gathered rows (N, d) -> (N, V), zero rows appended up to the row multiple."""
    n = h.shape[0]
    pad = _round_up(n, _row_multiple(opts)) - n
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
    return model.head(h)[:n]


def logits_at(model, seqs: Sequence[torch.Tensor], rows: torch.Tensor, pos: torch.Tensor, *,
              batch_invariant: bool = True) -> torch.Tensor:
    """Logits (P, V) at (rows[p], pos[p]) of one forward pass over `seqs` (1-D id tensors of any lengths,
    right-padded and hidden as keys), the head run on those P rows only. With `batch_invariant` a sequence's
    logits have the same bits whatever else is in the batch (CPU; module docstring "Batch invariance"): what
    `smdm.evaluate` scores continuations with."""
    opts = {"batch_invariant": batch_invariant}
    device = model.head.weight.device
    length = _round_up(max(len(s) for s in seqs), _len_multiple(opts))
    x, valid, positions = _padded(list(seqs), length, model.config.max_seq_len - 1)
    h = model.hidden(x.to(device), key_valid=valid.to(device), positions=positions.to(device))  # (R, Lp, d)
    return _head(model, h[rows.to(device), pos.to(device)], opts)


def _padded(seqs: list, length: int, max_pos: int):
    """Right-padded ids (B, length), key_valid (B, length) and positions (length,) clamped to the context."""
    device = seqs[0].device
    x = torch.zeros(len(seqs), length, dtype=torch.int64, device=device)
    valid = torch.zeros(len(seqs), length, dtype=torch.bool, device=device)
    for j, seq in enumerate(seqs):
        x[j, :len(seq)], valid[j, :len(seq)] = seq, True
    return x, valid, torch.arange(length, device=device).clamp(max=max_pos)


def _forward_block_cache(model, rows: list, opts: dict) -> int:
    """Block K/V caches (Fast-dLLM style), both approximate for a bidirectional model.
    cache="prefix": the first step of a block runs the full sequence and keeps the K/V of everything before
    the block (prompt + finished blocks); later steps of the block run only the block and what follows it,
    attending to the kept prefix (whose keys do not see the newer tokens after it).
    cache="dual" (Fast-dLLM's DualCache): the first step also keeps the K/V of everything after the block's
    span (the masks still to come, and given text after the holes when infilling); later steps run the block's
    span alone, attending to the kept prefix and suffix. The kept K/V sit in the cache as [prefix | suffix |
    block]: keys carry their RoPE positions and no mask orders them, so the slot order does not matter. When
    the EOS rule fills positions after the block with EOS, the row's next step runs in full again (the kept
    suffix saw masks there). opts["cache_refresh"] N: every N-th forward of a row inside a block also runs in
    full and rebuilds the kept K/V (positions committed since then are seen by the prefix/suffix again).
    Rows are grouped by (length, block span, full/partial) so that no row is padded for another."""
    cfg_on = opts["cfg_scale"] > 0
    dual = opts["cache"] == "dual"
    refresh = opts.get("cache_refresh")
    mask_id = model.config.mask_id
    groups: dict = {}
    for r in rows:
        block = r.blocks[r.b]
        start = int(block[0])  # every position before the current block is committed
        end = int(block[-1]) + 1 if dual else len(r.seq)  # the query chunk is [start, end)
        full = (any(r.stash.get(k, (None,))[0] != r.b for k in range(2 if cfg_on else 1)) or (dual and r.stale)
                or (refresh is not None and r.since_full >= refresh - 1))
        groups.setdefault((len(r.seq), start, end, full), []).append(r)
    calls = 0
    max_pos = model.config.max_seq_len - 1
    for (L, start, end, full), grp in groups.items():
        units = [(r, k, x) for r in grp for k, x in enumerate(_branches(r, mask_id, cfg_on))]
        if full:  # the whole (padded) sequence; keep the K/V of the prefix (and of the suffix: dual)
            Lp = _round_up(L, _len_multiple(opts))
            cache = model.make_kv_cache(len(units), Lp)
            x, valid, pos = _padded([u[2] for u in units], Lp, max_pos)
            h = model.hidden(x, key_valid=valid, positions=pos, kv_cache=cache, cache_pos=0)  # (G, Lp, d)
            for r in grp:
                r.stale, r.since_full = False, 0
            keep = torch.cat([torch.arange(start), torch.arange(end, L)]).to(x.device)  # prefix, suffix (dual)
            for g, (r, k, _) in enumerate(units):  # indexing copies: the stash owns its K/V
                r.stash[k] = (r.b, [t[g:g + 1, :, keep] for t in cache.k], [t[g:g + 1, :, keep] for t in cache.v])
            offset = 0
        else:  # the block's chunk (prefix: and what follows it), padded on the right, attending to the kept K/V
            kept = start + L - end
            Lq = _round_up(end - start, _row_multiple(opts))
            cache = model.make_kv_cache(len(units), kept + Lq)
            for layer in range(len(cache.k)):
                cache.k[layer][:, :, :kept] = torch.cat([r.stash[k][1][layer] for r, k, _ in units])
                cache.v[layer][:, :, :kept] = torch.cat([r.stash[k][2][layer] for r, k, _ in units])
            x, valid, pos = _padded([u[2][start:end] for u in units], Lq, max_pos)
            valid = torch.cat([torch.ones(len(units), kept, dtype=torch.bool, device=x.device), valid], 1)
            h = model.hidden(x, key_valid=valid, positions=(pos + start).clamp(max=max_pos), kv_cache=cache,
                             cache_pos=kept)  # (G, Lq, d)
            offset = start
            for r in grp:
                r.since_full += 1
        nb = 2 if cfg_on else 1
        picked = torch.cat([h[g, r.cand - offset] for g, (r, _, _) in enumerate(units)])
        logits = _head(model, picked, opts)
        a = 0
        for r in grp:
            n = len(r.cand)
            c = logits[a:a + n]
            u = logits[a + n:a + 2 * n] if cfg_on else None
            r.logits = guided_logits(c, u, opts["cfg_scale"])
            a += nb * n
            r.forwards += 1
        calls += 1
    return calls


# ------------------------------------------------------------------------------------------------------------
# The ARM twin: left-to-right decoding with the same token choice


def _generate_arm(model, prompts, gen_length, seeds, opts, eos_id, cache, callback):
    """Rows are grouped by prompt length and each group decodes in lockstep: no padding between rows, plain
    positions, and a row's computation is the same alone or in any batch (GEMM row counts aligned as in the
    module docstring: prompt and full-sequence chunks padded on the right, which a causal model never sees,
    the one-token decode batch completed with filler rows). cache="prefix": the static KV cache (prompt
    prefilled once, then one token per forward); cache="none": the full sequence every step (reference)."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: the ARM twin needs at least one prompt token (e.g. BOS)")
    device = next(model.parameters()).device
    choose = _dispatch("choose_tokens", device)
    R = _row_multiple(opts)
    max_pos = model.config.max_seq_len - 1
    out = [list(p) for p in prompts]
    row_forwards = [0] * len(prompts)
    row_steps = [0] * len(prompts)
    forwards = 0
    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)

    def full_forward(seq, kv):  # (G, n) -> hidden (G, n, d); right pads are invisible to causal queries
        n = seq.shape[1]
        x = torch.cat([seq, seq.new_zeros(seq.shape[0], _round_up(n, R) - n)], dim=1)
        pos = torch.arange(x.shape[1], device=device).clamp(max=max_pos)
        return model.hidden(x, positions=pos, kv_cache=kv)[:, :n]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calls = 0  # callback steps
            for plen, live in groups.items():  # live: indices (into prompts) of the rows still decoding
                # KV cache slots: the live rows, then fillers (copies of the first) up to the row multiple
                fill = _round_up(len(live), R) - len(live) if cache == "prefix" else 0
                src = list(range(len(live))) + [0] * fill
                seq = torch.tensor([prompts[live[k]] for k in src], dtype=torch.int64, device=device)
                kv = None
                if cache == "prefix":
                    kv = model.make_kv_cache(len(src), _round_up(plen, R) + gen_length)
                logits = _head(model, full_forward(seq, kv)[:len(live), -1], opts)
                forwards += 1
                for j in range(gen_length):
                    for i in live:
                        row_forwards[i] += 1
                    tok, _ = choose(logits.float(), seeds=torch.tensor([_i64(seeds[i]) for i in live]),
                                    positions=torch.full((len(live),), plen + j), step=j, **_token_opts(opts))
                    keep = []
                    for n, i in enumerate(live):
                        out[i].append(int(tok[n]))
                        row_steps[i] += 1
                        if eos_id is None or int(tok[n]) != eos_id:
                            keep.append(n)
                        else:  # EOS: fill the rest and stop spending compute on this row
                            out[i].extend([eos_id] * (gen_length - j - 1))
                    if callback is not None:  # one count over every group: rows of each prompt length in turn
                        calls += 1
                        callback(calls, [torch.tensor(o) for o in out])
                    if j == gen_length - 1 or not keep:
                        break
                    fill = _round_up(len(keep), R) - len(keep) if kv is not None else 0
                    sel = torch.tensor(keep + [keep[0]] * fill, device=device)  # live rows own slots 0..G-1
                    live = [live[n] for n in keep]
                    seq = torch.cat([seq[sel], tok[sel, None]], dim=1)  # (slots, plen + j + 1)
                    if kv is not None:  # one new token per slot
                        if len(keep) != len(tok):  # rows left: move the cache slots along
                            kv.k = [k[sel] for k in kv.k]
                            kv.v = [v[sel] for v in kv.v]
                        h = model.hidden(seq[:, -1:], kv_cache=kv, cache_pos=plen + j)[:len(live), -1]
                    else:
                        h = full_forward(seq, None)[:, -1]
                    logits = _head(model, h, opts)
                    forwards += 1
    finally:
        model.train(was_training)
    tokens = [_cut(o[len(p):], eos_id) for o, p in zip(out, prompts)]
    gen = sum(len(t) + (1 if eos_id is not None and len(t) < gen_length else 0) for t in tokens)
    return GenerationOutput(tokens=tokens, sequences=out, forward_passes=forwards,
                            row_forward_passes=row_forwards, steps=row_steps, generated_tokens=gen)


def _token_opts(opts: dict) -> dict:
    return dict(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"])
