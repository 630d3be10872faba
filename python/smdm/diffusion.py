"""Diffusion math of masked diffusion models (DESIGN §4): the forward process (masking), the losses and the
Monte Carlo ELBO. The masking part (top of this file) and the losses (below the marker) have different owners.
"""

# ---- forward process ----
# Noise schedules (alpha_t = probability that a token is still clean at time t) with their ELBO weights
# w(t) = -alpha'_t / (1 - alpha_t), and the forward process q(x_t | x_0) (paper Eq. 2): every token is
# masked independently with probability p = 1 - alpha(t'), t' = (1 - eps)·t + eps (linear: p = t').
# `forward_process` runs the Rust core (`smdm._core`); `forward_process_reference` is the plain numpy
# definition it must equal exactly (docs/CONTRACTS.md). SMDM_KERNELS=reference forces the reference.
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from smdm import rng
from smdm.rng import Stream


def _xp(t):
    """torch for tensors, numpy otherwise (floats, arrays)."""
    return torch if isinstance(t, torch.Tensor) else np


# Each schedule is two float64 function chains of the (effective) time t, p = 1 - alpha_t and w(t). The
# scalar forms (`math`, i.e. the C library's sin/tan/pow, the same functions the Rust core calls) define the
# forward process and the ELBO bit for bit (the samplers' step fractions have their own cancellation-free
# forms, `smdm.sampling.reveal_probability`); the array forms below them serve torch tensors (plots,
# analysis) and may differ from the scalar ones in the last bit (SIMD sin/cos/pow). Every function takes
# (t, power); only the polynomial ones use the power.
#   linear        p = t                          w = 1 / t
#   cosine        p = 1 - sin((1 - t)·(pi/2))    w = (pi/2) / tan(t·(pi/4))
#   polynomial:P  p = pow(t, P)                  w = P / t
# Cosine is alpha_t = cos(pi t / 2) written as sin((1 - t) pi/2) so that p(0) = 0 and p(1) = 1 exactly, and
# its weight (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) (MDLM's general weight) as (pi/2) / tan(pi t/4), the same
# number without the cancellation.
_HALF_PI = math.pi / 2  # == Rust's FRAC_PI_2 (scaling by a power of two is exact)
_QUARTER_PI = math.pi / 4  # == Rust's FRAC_PI_4


def _p_linear(t: float, power: float) -> float:
    return t


def _w_linear(t: float, power: float) -> float:
    return 1.0 / t


def _p_cosine(t: float, power: float) -> float:
    return 1.0 - math.sin((1.0 - t) * _HALF_PI)


def _w_cosine(t: float, power: float) -> float:
    return _HALF_PI / math.tan(t * _QUARTER_PI)


def _p_polynomial(t: float, power: float) -> float:
    return math.pow(t, power)


def _w_polynomial(t: float, power: float) -> float:
    return power / t


def alpha_linear(t, power: float = 1.0):
    """alpha_t = 1 - t (the paper's schedule, Eq. 2)."""
    return 1 - t


def alpha_cosine(t, power: float = 1.0):
    """alpha_t = cos(pi/2 · t) = sin((1 - t)·pi/2): fewer masks early, more late (MDLM's cosine;
    the sampler reveals most tokens in its first steps. MaskGIT's cosine is the mirror, alpha = 1 - sin(pi/2 · t))."""
    return _xp(t).sin((1 - t) * _HALF_PI)


def alpha_polynomial(t, power: float = 2.0):
    """alpha_t = 1 - t^power (power 1 is the linear schedule)."""
    return 1 - t**power


def elbo_weight_linear(t, power: float = 1.0):
    """-alpha'_t / (1 - alpha_t) = 1/t: the weight of the masked-token CE in the ELBO (paper Eq. 4)."""
    return 1 / t


def elbo_weight_cosine(t, power: float = 1.0):
    """-alpha'_t / (1 - alpha_t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t/4)."""
    return _HALF_PI / _xp(t).tan(t * _QUARTER_PI)


def elbo_weight_polynomial(t, power: float = 2.0):
    """-alpha'_t / (1 - alpha_t) = power · t^(power-1) / t^power = power / t."""
    return power / t


# name -> (scalar p, scalar w, array alpha, array w), each f(t, power): the explicit table of schedules.
SCHEDULES = {
    "linear": (_p_linear, _w_linear, alpha_linear, elbo_weight_linear),
    "cosine": (_p_cosine, _w_cosine, alpha_cosine, elbo_weight_cosine),
    "polynomial": (_p_polynomial, _w_polynomial, alpha_polynomial, elbo_weight_polynomial),
}
# name -> array function (kept for callers that plot a schedule); the masking probability is 1 - alpha_t.
ALPHAS = {"linear": alpha_linear, "cosine": alpha_cosine, "polynomial": alpha_polynomial}
ELBO_WEIGHTS = {"linear": elbo_weight_linear, "cosine": elbo_weight_cosine,
                "polynomial": elbo_weight_polynomial}


@dataclass(frozen=True)
class Schedule:
    """A noise schedule: `parse_schedule("cosine")`. Methods take a float, a numpy array (evaluated element
    by element with `math`: the exact numbers of docs/CONTRACTS.md) or a torch tensor (vectorised; may differ
    in the last bit)."""

    kind: str  # "linear" | "cosine" | "polynomial"
    power: float = 1.0  # the exponent P of "polynomial:P" (unused by the others)

    @property
    def name(self) -> str:
        """Canonical name, parsed back to the same schedule by Python and by the Rust core."""
        return f"polynomial:{self.power!r}" if self.kind == "polynomial" else self.kind

    def _apply(self, which: int, t):
        if isinstance(t, torch.Tensor):
            if which == 0:
                return 1 - SCHEDULES[self.kind][2](t, self.power)
            return SCHEDULES[self.kind][3](t, self.power)
        fn = SCHEDULES[self.kind][which]
        if isinstance(t, np.ndarray):
            flat = [fn(float(v), self.power) for v in t.ravel()]
            return np.array(flat, dtype=np.float64).reshape(t.shape)
        return fn(float(t), self.power)

    def mask_prob(self, t):
        """p = 1 - alpha_t: the probability that a token is masked at time t (linear: t itself)."""
        return self._apply(0, t)

    def alpha(self, t):
        """alpha_t, the probability that a token is still clean at time t: 1 - mask_prob(t)."""
        return 1 - self.mask_prob(t)

    def weight(self, t):
        """The ELBO weight w(t) = -alpha'_t / (1 - alpha_t): NLL <= E_t[w(t) Σ_masked CE] (DESIGN §4)."""
        return self._apply(1, t)


def parse_schedule(schedule) -> Schedule:
    """'linear' | 'cosine' | 'polynomial' (power 2) | 'polynomial:P' (P a positive finite float), or a
    Schedule (returned as is). Raises ValueError naming the value."""
    if isinstance(schedule, Schedule):
        return schedule
    hint = "expected 'linear', 'cosine' or 'polynomial:P' with P a positive number"
    if not isinstance(schedule, str):
        raise ValueError(f"unknown schedule {schedule!r}; {hint}")
    if schedule in ("linear", "cosine"):
        return Schedule(schedule)
    if schedule == "polynomial":
        return Schedule("polynomial", 2.0)
    if schedule.startswith("polynomial:"):
        text = schedule[len("polynomial:"):]
        try:
            power = float(text)
        except ValueError:
            raise ValueError(f"unknown schedule {schedule!r}; {hint} (cannot read the power {text!r})") from None
        if not (math.isfinite(power) and power > 0) or text != text.strip():
            raise ValueError(f"unknown schedule {schedule!r}; {hint} (the power {text!r} is not)")
        return Schedule("polynomial", power)
    raise ValueError(f"unknown schedule {schedule!r}; {hint}")


def alpha(t, schedule: str = "linear"):
    """alpha_t of the named schedule (float, numpy array or torch tensor)."""
    return parse_schedule(schedule).alpha(t)


def elbo_weight(t, schedule: str = "linear"):
    """ELBO weight -alpha'_t / (1 - alpha_t) of the named schedule (DESIGN §4):
    NLL <= E_t[w(t) Σ_masked CE]."""
    return parse_schedule(schedule).weight(t)


@dataclass
class NoisyBatch:
    """x_t from the forward process. Rows are cut to `length` (the random-length crop): use
    `tokens[:, :length]` as the targets."""

    noisy_ids: torch.Tensor  # (B, length) int64: masked tokens hold mask_id (and dropped prompts do too)
    mask: torch.Tensor  # (B, length) bool: the tokens the loss is computed on (never prompt positions)
    t: torch.Tensor  # (B,) float64 diffusion time
    p: torch.Tensor  # (B,) float64 masking probability 1 - alpha(t'), t' = (1 - eps)·t + eps (linear: t')
    weight: torch.Tensor  # (B, length) float32: float32(w(t')) at masked tokens, 0 elsewhere (<= w(eps);
    # linear: 1/p <= 1/eps)
    length: int  # row length after the crop (L when no crop happened)
    uncond: torch.Tensor  # (B,) bool: the sample's prompt was replaced by masks (CFG training)


_TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int64))
_U64 = 1 << 64


def _check_args(tokens: np.ndarray, *, seed, step, sample_offset, global_batch, mask_id, eps, stratified,
                prompt_lens, crop_prob, p_uncond, schedule="linear") -> int:
    """Validate the arguments with the messages of the Rust core; return the stratification denominator."""
    def bad(msg):
        raise ValueError(f"forward_process: {msg}")

    if tokens.ndim != 2:
        bad(f"tokens must be 2-D (batch, length), got shape {tokens.shape}")
    if tokens.dtype not in _TOKEN_DTYPES:
        bad(f"tokens must hold uint16, uint32 or int64 token ids, got {tokens.dtype}")
    B, L = tokens.shape
    if L == 0:
        bad("sequence length must be >= 1, got 0")
    for name, v in (("seed", seed), ("step", step), ("sample_offset", sample_offset)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < _U64:
            bad(f"{name} must be an integer in [0, 2**64), got {v!r}")
    if not eps > 0 or not eps <= 1:  # written so that NaN fails
        bad(f"eps must be in (0, 1], got {eps}")
    try:
        parse_schedule(schedule)
    except ValueError as e:
        bad(str(e))
    if not 0 <= crop_prob <= 1:
        bad(f"crop_prob must be in [0, 1], got {crop_prob}")
    if not 0 <= p_uncond <= 1:
        bad(f"p_uncond must be in [0, 1], got {p_uncond}")
    max_id = np.iinfo(tokens.dtype).max
    if not isinstance(mask_id, (int, np.integer)):
        bad(f"mask_id must be an integer, got {mask_id!r}")
    if not 0 <= int(mask_id) <= max_id:
        bad(f"mask_id {mask_id} does not fit the token dtype {tokens.dtype} (max {max_id})")
    if p_uncond > 0 and prompt_lens is None:
        bad("p_uncond > 0 needs prompt_lens (the prompt to drop)")
    if prompt_lens is not None:
        if prompt_lens.shape != (B,):
            bad(f"prompt_lens has shape {prompt_lens.shape}, expected one entry per row ({B},)")
        out = (prompt_lens < 0) | (prompt_lens > L)
        if out.any():
            i = int(np.argmax(out))
            bad(f"prompt_lens[{i}] = {int(prompt_lens[i])} is outside [0, {L}] (the sequence length)")
    if global_batch is None:
        if sample_offset == 0:
            return max(B, 1)
        if stratified:
            bad("stratified t with sample_offset > 0 needs global_batch (the step's global batch size)")
        return sample_offset + B
    if global_batch < 1 or sample_offset + B > global_batch:
        bad(f"global_batch {global_batch} must be >= 1 and cover sample_offset {sample_offset} + batch {B}")
    return int(global_batch)


def _sample_keys(seed: int, step: int, samples: np.ndarray, stream: int, *tail: int) -> np.ndarray:
    """key(seed, step, s, stream, *tail) for a uint64 array of sample indices s (vectorised fold)."""
    h = rng.key(seed, step)  # the fold up to the sample word is shared
    h = rng.splitmix64(np.uint64(h) ^ samples)
    for w in (stream, *tail):
        h = rng.splitmix64(h ^ np.uint64(w))
    return h


def crop_length(seed: int, step: int, seq_len: int, crop_prob: float) -> int:
    """Random-length crop (DESIGN §4): with probability crop_prob, 1 + floor(u · L) with u from
    key(seed, step, 0, CROP, 1); else L. Keyed by (seed, step) only: every rank cuts to the same length."""
    if seq_len == 0 or not rng.uniform(rng.key(seed, step, 0, Stream.CROP, 0)) < crop_prob:
        return seq_len
    u = rng.uniform(rng.key(seed, step, 0, Stream.CROP, 1))
    return 1 + min(math.floor(u * seq_len), seq_len - 1)


def forward_process_reference(tokens: np.ndarray, *, seed: int, step: int, mask_id: int,
                              sample_offset: int = 0, global_batch: int | None = None, eps: float = 1e-3,
                              stratified: bool = False, prompt_lens: np.ndarray | None = None,
                              crop_prob: float = 0.01, p_uncond: float = 0.0, schedule="linear"):
    """The forward process in plain numpy: the definition `smdm._core.forward_process` equals exactly.

    tokens: (B, L) uint16/uint32/int64. Sample s = sample_offset + i (its global index) draws
      t_s = uniform(key(seed, step, s, TIME, 0))                    (i.i.d. t ~ U[0, 1))
      or stratified: x = u + s / global_batch, t_s = x - floor(x)   (u: key(seed, step, 0, STRATIFIED, 0))
      t'_s = (1 - eps)·t_s + eps                                    (effective time, floored at eps)
      p_s = 1 - alpha(t'_s)                                         (`Schedule.mask_prob`; linear: t'_s)
      token j masked iff uniform(splitmix64(key(seed, step, s, TOKEN) ^ j)) < p_s and j >= prompt_len_s
      weight = float32(w(t'_s)) at masked tokens                    (`Schedule.weight`; linear: 1/t', Eq. 3)
      uncond_s = uniform(key(seed, step, s, UNCOND, 0)) < p_uncond  (its prompt becomes mask_id in `noisy`)
    after the crop to `length = crop_length(seed, step, L, crop_prob)` columns.
    Returns (noisy (B, length) tokens.dtype, mask bool, t float64 (B,), p float64 (B,), weight float32,
    length int, uncond bool (B,))."""
    tokens = np.asarray(tokens)
    pl = None if prompt_lens is None else np.asarray(prompt_lens, dtype=np.int64)
    gb = _check_args(tokens, seed=seed, step=step, sample_offset=sample_offset, global_batch=global_batch,
                     mask_id=mask_id, eps=eps, stratified=stratified, prompt_lens=pl, crop_prob=crop_prob,
                     p_uncond=p_uncond, schedule=schedule)
    sched = parse_schedule(schedule)
    B, L = tokens.shape
    length = crop_length(seed, step, L, crop_prob)
    s = np.uint64(sample_offset) + np.arange(B, dtype=np.uint64)  # (B,) global sample indices
    if stratified:
        x = rng.uniform(rng.key(seed, step, 0, Stream.STRATIFIED, 0)) + s.astype(np.float64) / float(gb)
        t = x - np.floor(x)  # (B,)
    else:
        t = rng.uniform(_sample_keys(seed, step, s, Stream.TIME, 0))  # (B,)
    te = (1 - eps) * t + eps  # (B,) effective time
    # per sequence, with Python's math (the C library's sin/tan/pow, as the Rust core): numpy's SIMD
    # transcendental functions may differ in the last bit
    p = sched.mask_prob(te)  # (B,) float64
    w = sched.weight(te).astype(np.float32)  # (B,)
    j = np.arange(length, dtype=np.uint64)  # (length,)
    u = rng.uniform(rng.splitmix64(_sample_keys(seed, step, s, Stream.TOKEN)[:, None] ^ j))  # (B, length)
    mask = u < p[:, None]
    if pl is not None:
        prompt = j[None, :].astype(np.int64) < pl[:, None]  # (B, length)
        mask &= ~prompt
    x0 = tokens[:, :length]
    noisy = np.where(mask, np.asarray(mask_id, dtype=tokens.dtype), x0).astype(tokens.dtype)
    uncond = rng.uniform(_sample_keys(seed, step, s, Stream.UNCOND, 0)) < p_uncond  # (B,)
    if pl is not None:
        noisy[prompt & uncond[:, None]] = mask_id
    weight = np.where(mask, w[:, None], np.float32(0)).astype(np.float32)
    return noisy, mask, t, p, weight, length, uncond


def _use_reference() -> bool:
    return os.environ.get("SMDM_KERNELS", "").strip().lower() == "reference"


def _rust_core():
    """The extension module, or a clear error (never a silent switch to the 10x slower reference)."""
    try:
        from smdm import _core
    except ImportError as e:
        raise ImportError("smdm._core (the Rust extension) is not built: run `pip install -e .` or "
                          "`maturin develop --release`, or set SMDM_KERNELS=reference") from e
    return _core


def forward_process(tokens, *, seed: int, step: int, sample_offset: int = 0, global_batch: int | None = None,
                    mask_id: int, eps: float = 1e-3, stratified: bool = False, prompt_lens=None,
                    crop_prob: float = 0.01, p_uncond: float = 0.0, schedule="linear") -> NoisyBatch:
    """The forward process q(x_t | x_0) of a training batch (DESIGN §4, docs/CONTRACTS.md).

    tokens: (B, L) torch LongTensor or numpy uint16/uint32/int64 array of clean ids.
    seed, step: the key of this step's draws; sample_offset: global index of row 0 (rank · local batch), so
      a sample draws the same t and mask whatever the batch split; global_batch: the step's global batch size
      (stratified t: t_s = (u + s/global_batch) mod 1; needed when sample_offset > 0).
    prompt_lens: (B,) ints (SFT): positions < prompt_len are never masked; with p_uncond > 0 each sample's
      prompt is replaced by mask_id with probability p_uncond (CFG training; `uncond` says which).
    crop_prob: probability that the whole batch is cut to a random length in 1..L (the same for all ranks).
    schedule: "linear" | "cosine" | "polynomial:P" (or a `Schedule`): tokens are masked with probability
      p = 1 - alpha(t') and weighted by w(t') = -alpha'/(1 - alpha) at t' = (1 - eps)·t + eps, so `mdm_loss`
      / `sft_loss` (which read `weight`) are the ELBO of that schedule.
    Runs the Rust core (GIL released, rows in parallel) unless SMDM_KERNELS=reference; both give identical
    values. Outputs live on the device of `tokens` (computed on CPU)."""
    device = tokens.device if isinstance(tokens, torch.Tensor) else torch.device("cpu")
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"forward_process: tokens must be integer token ids, got {tokens.dtype}")
        x = tokens.detach().to("cpu", torch.int64).numpy()
    else:
        x = np.asarray(tokens)
        if x.dtype.kind not in "iu":
            raise ValueError(f"forward_process: tokens must be integer token ids, got {x.dtype}")
        if x.dtype not in _TOKEN_DTYPES:
            x = x.astype(np.int64)
    x = np.ascontiguousarray(x)
    pl = None
    if prompt_lens is not None:
        if isinstance(prompt_lens, torch.Tensor):
            prompt_lens = prompt_lens.detach().cpu().numpy()
        pl = np.ascontiguousarray(prompt_lens, dtype=np.int64)
    def scalar(v):  # a 0-d integer tensor (a model's config value moved to a tensor) as the int it holds
        integer = isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() and v.dtype != torch.bool
        return int(v) if integer else v

    kw = dict(seed=scalar(seed), step=scalar(step), sample_offset=scalar(sample_offset),
              global_batch=scalar(global_batch), mask_id=scalar(mask_id), eps=eps, stratified=stratified,
              prompt_lens=pl, crop_prob=crop_prob, p_uncond=p_uncond)
    try:
        name = parse_schedule(schedule).name  # canonical: the Rust core parses the same number
    except ValueError as e:
        raise ValueError(f"forward_process: {e}") from None
    if _use_reference():
        out = forward_process_reference(x, **kw, schedule=name)
    else:
        _check_args(x, **kw)  # clearer messages than a failed conversion at the Rust boundary
        out = _rust_core().forward_process(x, **kw, schedule=name)
    noisy, mask, t, p, weight, length, uncond = out
    if noisy.dtype != np.int64:  # uint16/uint32 windows: the model takes int64 ids
        noisy = noisy.astype(np.int64)
    if device.type == "cpu":  # no copies: the tensors share the arrays Rust wrote
        as_t = torch.from_numpy
    else:
        as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=False)
    return NoisyBatch(noisy_ids=as_t(noisy), mask=as_t(mask), t=as_t(t), p=as_t(p), weight=as_t(weight),
                      length=int(length), uncond=as_t(uncond))


# ---- losses ----
# Losses and likelihoods (DESIGN §4). The output head and the cross-entropy are computed only at the rows that
# enter the loss (`model.head(h[mask])`): memory and FLOPs of the vocabulary projection scale with the masked
# fraction instead of B·L. The training losses are weighted sums of per-row CE: `smdm.linear_ce` computes them
# in chunks of rows without holding the logits of all rows.
import math as _math  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

import numpy as _np  # noqa: E402
import torch as _torch  # noqa: E402

from smdm import rng as _rng  # noqa: E402
from smdm.config import ELBO_ESTIMATORS, check_estimator  # noqa: E402, F401  (torch-free home, shared with the CLIs)
from smdm.linear_ce import cross_entropy_rows as _ce_rows  # noqa: E402
from smdm.linear_ce import linear_cross_entropy as _linear_ce  # noqa: E402


def ce_dtype(logits):
    """CE in at least float32 (bf16/fp16 logits upcast; a float64 model's logits stay float64)."""
    return logits.to(_torch.promote_types(logits.dtype, _torch.float32))


def _masked_ce(model, noisy, x0, mask, *, segment_ids=None, positions=None):
    """Cross-entropy (at least float32) at the masked rows only, in row-major order of `mask`: (M,)."""
    h = model.hidden(noisy, segment_ids=segment_ids, positions=positions)  # (B, L, d)
    return _ce_rows(h[mask], model.head.weight, x0[mask])  # (M,): the head on masked rows only, in chunks


def _require_mdm(model, what: str) -> None:
    if model.config.causal or model.config.mask_id is None:
        raise ValueError(f"{what} is for the MDM (a bidirectional model with a mask token); the ARM twin "
                         f"trains with ar_loss")


def mdm_loss(model, noisy, x0, mask, weight, *, segment_ids=None, positions=None):
    """MDM pretraining loss (paper Eq. 3): sum over masked tokens of w(t)·CE(x0), divided by B·L (all
    tokens, masked or not). The schedule lives entirely in `weight`: w = 1/p for the linear schedule, the
    general -alpha'/(1 - alpha) for the others (DESIGN §4), so the loss is the ELBO of whatever schedule
    `forward_process(..., schedule=)` masked with.

    noisy, x0: (B, L) int64; mask: (B, L) bool; weight: (B, L) float = w(t') at masked tokens (from
    `forward_process`). A batch without a masked token gives an exact, finite zero (with a graph)."""
    _require_mdm(model, "mdm_loss")
    h = model.hidden(noisy, segment_ids=segment_ids, positions=positions)  # (B, L, d)
    rows = weight[mask].to(_torch.float64) / mask.numel()  # (M,)
    return _linear_ce(h[mask], model.head.weight, x0[mask], rows)


def sft_loss(model, noisy, x0, mask, weight, prompt_lens, *, positions=None):
    """SFT loss (SMDM / LLaDA): prompt tokens are never masked (the forward process got `prompt_lens`); each
    sequence's sum of w(t')·CE (linear: CE / p) over masked answer tokens is divided by its number of non-prompt tokens
    (answer + EOS padding), then averaged over the batch.

    prompt_lens: (B,) int. For standard CFG training `noisy` comes from `forward_process(...,
    prompt_lens=..., p_uncond=...)`, which replaces dropped prompts by masks: inputs only, never targets."""
    _require_mdm(model, "sft_loss")
    B, L = x0.shape
    h = model.hidden(noisy, positions=positions)  # (B, L, d)
    answer_len = (L - _torch.as_tensor(prompt_lens, device=x0.device)).clamp(min=1)  # (B,)
    row = _torch.arange(B, device=x0.device)[:, None].expand(B, L)[mask]  # (M,) the sequence of each row
    rows = weight[mask].to(_torch.float64) / answer_len[row].to(_torch.float64) / B  # (M,)
    return _linear_ce(h[mask], model.head.weight, x0[mask], rows)


def ar_loss(model, tokens, *, segment_ids=None):
    """Next-token cross-entropy of the autoregressive twin over windows of L + 1 tokens: (B, L+1) -> mean
    over the B·L predictions. With `segment_ids` attention stays inside each document (the first token of a
    document is predicted from the EOS that closes the previous one, which sees only its own document)."""
    if not model.config.causal:
        raise ValueError("ar_loss is for the autoregressive twin (config.causal): a bidirectional model sees the "
                         "very tokens it would predict")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg = None if segment_ids is None else segment_ids[:, :-1]
    h = model.hidden(inputs, segment_ids=seg)  # (B, L, d)
    rows = _torch.full((targets.numel(),), 1.0 / targets.numel(), dtype=_torch.float64, device=tokens.device)
    return _linear_ce(h.reshape(-1, h.shape[-1]), model.head.weight, targets.reshape(-1), rows)


@_dataclass
class Elbo:
    """Monte Carlo ELBO of -log p(target | prompt) per sequence, in nats."""

    nll: _torch.Tensor  # (B,) float64: estimate of the negative ELBO (an upper bound on the NLL)
    stderr: _torch.Tensor  # (B,) float64: standard error of the estimate (the iid formula over the samples;
    # stratification lowers the true variance, but the linear "time" estimator's heavy tail makes this
    # understate its spread: `elbo_nll`)
    n_tokens: _torch.Tensor  # (B,) target tokens per sequence (nll / n_tokens is nats per token)
    n_samples: int
    estimator: str = "time"
    samples: _torch.Tensor | None = None  # (n_samples, B) float64: the per-sample estimates (nll = their mean).
    # All rows of one seed share their times t_k, so their errors are correlated: the standard error of a sum
    # over rows (over batches of the same seed too) is `sum_stderr(samples.sum(1), times, stratified=...)`, not
    # the root of the rows' summed squared stderrs (which understates it more the more rows are summed)
    times: _torch.Tensor | None = None  # (n_samples,) float64: t_k of each sample (shared by the rows)
    stratified: bool = True  # t_k = (k + 1 - u) / n with one u (else i.i.d.)


def elbo_times(n_samples: int, seed: int, stratified: bool = True) -> _np.ndarray:
    """The times t_k of `elbo_nll`'s samples, shared by every row: (n,) float64 in (0, 1]. Stratified:
    t_k = (k + 1 - u) / n with u = uniform(key(seed, 0, 0, STRATIFIED, 0)); else t_k = 1 - uniform(key(seed, k, 0,
    TIME, 0))."""
    if stratified:
        u = _rng.uniform(_rng.key(seed, 0, 0, _rng.Stream.STRATIFIED, 0))
        return (_np.arange(n_samples) + 1.0 - u) / n_samples
    keys = [_rng.key(seed, k, 0, _rng.Stream.TIME, 0) for k in range(n_samples)]
    return 1.0 - _rng.uniform(_np.array(keys, dtype=_np.uint64))


def sum_stderr(totals: _torch.Tensor, times: _torch.Tensor, *, stratified: bool) -> float:
    """Standard error of a sum of `elbo_nll` estimates made with one seed: `totals` (n,) is the sum over the rows
    of `Elbo.samples`, `times` and `stratified` its `Elbo.times` and `Elbo.stratified` (every row shares the
    times, so the per-sample sums are the draws).

    i.i.d. t_k: the plain std(totals) / sqrt(n). Stratified t_k = (k + 1 - u) / n with one shared u: the totals
    follow a trend in t (more masks, more CE per token) that stratification cancels but std(totals) counts,
    which overstated the error 1.8-5.9x on 64 windows of the demo MDM. Fitting totals ≈ a + b t_k, the noise
    around the trend contributes s² / n (s² the residual variance) and the shared offset u, which slides every
    t_k by the same (1/2 - u) / n, contributes b² / (12 n²). Measured (benches/elbo_sum_stderr.py: 64 windows
    of the demo MDM, 12-40 seeds per setting, two seed sets for some): true spread / this estimate 1.03 at n = 4
    (count), 0.85-0.93 at n = 16 (count), 1.07 (time), 0.38-0.61 at n = 64 (count: conservative), 0.95-1.00
    (time), 0.49 at n = 128 (count), 1.04 (time); the root of the rows' summed squared stderrs gave 2.34,
    1.41-1.55, 1.15, 0.57-0.91, 0.98-1.17, 0.69, 1.07. With many samples of the count estimator the linear
    trend leaves curvature in the residual: conservative. n = 2 leaves no residual: the plain formula
    (conservative) then."""
    n = len(totals)
    if not stratified or n < 3:
        return float(totals.std(unbiased=True)) / _math.sqrt(n)
    x = _torch.stack([_torch.ones(n, dtype=_torch.float64), times.double()], 1)  # (n, 2)
    coef = _torch.linalg.lstsq(x, totals.double()[:, None]).solution[:, 0]  # (a, b)
    s2 = float(((totals.double() - x @ coef) ** 2).sum()) / (n - 2)
    return _math.sqrt(s2 / n + float(coef[1]) ** 2 / (12 * n * n))


def elbo_counts(t, n_targets) -> _np.ndarray:
    """The "count" estimator's masked-token counts l = ceil(t_k * T_b), clipped to [1, T_b] (0 where T_b = 0):
    times (n,) and target counts (B,) -> (n, B) int64. A t uniform in (0, 1] makes l uniform on {1, ..., T}."""
    T = _np.asarray(n_targets, dtype=_np.int64)[None, :]
    n_masked = _np.ceil(_np.asarray(t, dtype=_np.float64)[:, None] * T).astype(_np.int64)
    return _np.clip(n_masked, _np.minimum(T, 1), T)


def elbo_count_weights(t, n_targets) -> _np.ndarray:
    """The "count" estimator's sample weights T_b / l_kb, (n, B) float64 (0 where T_b = 0: nothing masked)."""
    T = _np.asarray(n_targets, dtype=_np.int64)
    return T[None, :] / _np.maximum(elbo_counts(t, T), 1)


def elbo_masks(B, L, n_samples, first, count, seed, row_ids, t, target, schedule="linear", estimator="time"):
    """The ELBO's draws (public: `smdm.evaluate` scores continuations with the same masks as `elbo_nll`).
    Masks (count, B, L) for samples [first, first+count). Each token j of row b in sample k has the draw
    u = uniform(splitmix64(key(seed, k, row_id_b, TOKEN) ^ j)); only target positions are masked.
    estimator "time": j is masked iff u < p_k, p_k = 1 - alpha(t_k) of the schedule (`Schedule.mask_prob`;
    linear: t_k itself). "count": exactly l = `elbo_counts`(t_k, T_b) targets are masked, those with the l
    smallest draws (a uniform l-subset of the T_b targets); the schedule plays no part."""
    check_estimator(estimator)
    ks = _np.arange(first, first + count, dtype=_np.uint64)
    keys = _np.array([[_rng.key(seed, int(k), int(r), _rng.Stream.TOKEN) for r in row_ids] for k in ks],
                     dtype=_np.uint64)  # (count, B)
    u = _rng.uniform(_rng.splitmix64(keys[:, :, None] ^ _np.arange(L, dtype=_np.uint64)))  # (count, B, L)
    tk = _np.asarray(t[first:first + count], dtype=_np.float64)
    target = target.cpu()
    if estimator == "count":
        tgt = target.numpy()
        u = _np.where(tgt[None], u, 2.0)  # non-targets rank after every target (draws are < 1)
        rank = _np.empty(u.shape, dtype=_np.int64)
        _np.put_along_axis(rank, _np.argsort(u, axis=-1, kind="stable"), _np.arange(L, dtype=_np.int64), axis=-1)
        n_masked = elbo_counts(tk, tgt.sum(1))  # (count, B)
        return _torch.from_numpy(rank < n_masked[:, :, None])
    p = parse_schedule(schedule).mask_prob(tk)  # (count,)
    mask = u < p[:, None, None]
    return _torch.from_numpy(mask) & target[None]


@_torch.no_grad()
def elbo_nll(model, tokens, *, prompt_lens=None, segment_ids=None, n_samples: int = 128, seed: int = 0,
             row_ids=None, max_rows: int = 64, stratified: bool = True, schedule="linear",
             estimator: str = "time") -> Elbo:
    """Monte Carlo ELBO (DESIGN §4, paper Eq. 4): -log p(target | prompt) <= E_t [ w(t) sum_{masked} CE ].

    tokens: (B, L) prompt + target (a packed window is all target: prompt_lens None). The prompt stays clean
    and only target tokens are masked, each independently with probability p_k = 1 - alpha(t_k) of the
    `schedule` (linear: t_k). t is stratified over the samples: t_k = (k + 1 - u) / n_samples with one
    shared u (so t in (0, 1]); NLL ≈ mean_k w(t_k) sum_masked CE (linear: sum_masked CE / t_k, computed as
    that division; other schedules multiply by the float64 w(t_k) of `Schedule.weight`). The continuous-time
    ELBO does not depend on the schedule (substitute p = 1 - alpha_t: w dt = dp/p); the variance does.
    The draws are keyed by (seed, sample, row id) only. The default row ids, arange(B), are the rows' places
    in the batch, so a sequence's estimate changes when it moves; give ids that travel with the sequence (e.g.
    `smdm.evaluate.context_row_id` of its tokens, as `smdm.evaluate` does) and the estimate does not depend on
    the batch layout. Rows are evaluated `max_rows` (sample, sequence) pairs per forward pass, which never
    changes the estimate.

    estimator "time" (the default above, DESIGN §4): with the linear schedule its variance is infinite (a token
    masked at a tiny t_k weighs 1/t_k; the second moment grows like the integral of dt/t near 0), so the
    estimate is unbiased but heavy-tailed and its standard error tends to understate the spread; cosine and
    polynomial schedules have a finite variance. "count" (LLaDA's estimator, Nie et al. 2025): sample k masks
    exactly l = ceil(t_k T) of the row's T targets, chosen uniformly (`elbo_masks`), and weighs their CE by T / l.
    l is uniform on {1..T} (stratified like t), so each mask set of size m has weight 1 / (m C(T, m)), the
    same expectation as `elbo_exact`, with weights at most T: a finite variance and a trustworthy standard
    error. `schedule` does not apply to it."""
    if n_samples < 2:
        raise ValueError(f"elbo_nll needs n_samples >= 2 for a standard error, got {n_samples}")
    check_estimator(estimator)
    mask_id = model.config.mask_id
    if mask_id is None:
        raise ValueError("elbo_nll is for the MDM (a bidirectional model); the ARM's NLL is exact (ar_loss)")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == _torch.bool:
        raise ValueError(f"elbo_nll: tokens must be integer ids, got {tokens.dtype}")
    tokens = tokens.long()  # int32 ids too (the CE targets must be int64)
    device = tokens.device
    B, L = tokens.shape
    pos = _torch.arange(L, device=device)[None, :]
    if prompt_lens is None:
        target = _torch.ones(B, L, dtype=_torch.bool, device=device)
    else:
        target = pos >= _torch.as_tensor(prompt_lens, device=device)[:, None]  # (B, L)
    row_ids = _np.arange(B) if row_ids is None else _np.asarray(row_ids)
    sched = parse_schedule(schedule)
    t = elbo_times(n_samples, seed, stratified)
    per_sample = _torch.zeros(n_samples, B, dtype=_torch.float64)
    n_targets = target.sum(1).cpu().numpy()
    chunk = max(1, max_rows // B)  # samples per forward pass
    for first in range(0, n_samples, chunk):
        count = min(chunk, n_samples - first)
        mask = elbo_masks(B, L, n_samples, first, count, seed, row_ids, t, target, sched, estimator)  # (c, B, L)
        mask = mask.to(device)
        x0 = tokens[None].expand(count, B, L)
        noisy = _torch.where(mask, _torch.full_like(x0, mask_id), x0).reshape(count * B, L)
        seg = None if segment_ids is None else segment_ids[None].expand(count, B, L).reshape(count * B, L)
        flat = mask.reshape(count * B, L)
        ce = _masked_ce(model, noisy, x0.reshape(count * B, L), flat, segment_ids=seg).double()  # (M,)
        row = _torch.arange(count * B, device=device)[:, None].expand(count * B, L)[flat]
        sums = _torch.zeros(count * B, dtype=_torch.float64, device=device).index_add_(0, row, ce)
        tk = t[first:first + count]
        if estimator == "count":  # T_b / l_kb
            w = _torch.from_numpy(elbo_count_weights(tk, n_targets))
            per_sample[first:first + count] = sums.reshape(count, B).cpu() * w
        elif sched.kind == "linear":  # CE / t_k: the linear weight as a division, bit for bit as always
            per_sample[first:first + count] = sums.reshape(count, B).cpu() / _torch.from_numpy(tk)[:, None]
        else:
            w = _torch.from_numpy(sched.weight(tk))  # (c,) float64
            per_sample[first:first + count] = sums.reshape(count, B).cpu() * w[:, None]
    nll = per_sample.mean(0)
    stderr = per_sample.std(0, unbiased=True) / _math.sqrt(n_samples)
    return Elbo(nll=nll, stderr=stderr, n_tokens=target.sum(1).cpu(), n_samples=n_samples, estimator=estimator,
                samples=per_sample, times=_torch.from_numpy(_np.asarray(t, dtype=_np.float64)), stratified=stratified)


def elbo_exact(model, tokens, prompt_lens=None) -> _torch.Tensor:
    """The ELBO of `elbo_nll` computed exactly by enumerating every mask set M of the target positions (tiny
    targets only, 2^T forward rows per sequence): sum_M [sum_{i in M} CE_i(x_M)] · (|M|-1)! (T-|M|)! / T!,
    the integral over t of t^|M|-1 (1-t)^(T-|M|). Returns (B,) float64. Used as the oracle in tests.
    The same for every schedule: with p = 1 - alpha_t, w(t) dt = dp/p and the integral runs over p in (0, 1)."""
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
