"""smdm's CUDA kernels (DESIGN.md §7) with their PyTorch references.

    unmask_step(logits, tokens, candidates, seeds, step, ...)   fused unmasking step of the samplers
    attention(q, k, v, ...)                                     bidirectional flash attention forward
    choose_tokens / select_positions                            its two halves (smdm.sampling's signatures)
    unmask_step_reference / attention_reference / ...           the oracles (plain PyTorch, any device)
    build() / check_sources()                                   JIT build / compile check of csrc/
    `smdm kernels check|build|sass`                             the same from the command line

Backend choice (`backend=` argument of each op): "auto" runs the CUDA kernel for CUDA tensors when the
configuration is supported and the reference otherwise; the environment variable `SMDM_KERNELS=reference`
makes "auto" use the reference everywhere. "cuda" demands the kernel: an unsupported configuration, CPU
tensors or a failed build raise (`KernelBuildError`) instead of falling back. "reference" always uses it.
The same holds under `torch.compile` (fullgraph included): while tracing, the public functions emit the
registered op `torch.ops.smdm.*` with the requested backend ("auto" or "cuda") and the op decides when it
first runs: it builds the kernels there, and for "auto" falls back to the reference when the build fails or
the configuration is unsupported (attention: q/k/v not 16-byte aligned, which tracing cannot see), while
"cuda" raises the eager error. The sampler functions (`unmask_step`, `choose_tokens`, `select_positions`)
always trace into their op (its reference branch on CPU or with the reference backend: the references
use data-dependent shapes); `attention` traces its reference inline when the reference is chosen at trace
time (CPU tensors, SMDM_KERNELS=reference, a statically unsupported configuration), so it stays
differentiable. SMDM_KERNELS is read when tracing (and by an "auto" op again when it runs); the build
path (SMDM_KERNEL_BUILD) when building.

Sources live in `smdm/kernels/csrc/` (package data, so an installed wheel has them; the repository's top-level
`csrc` is a symlink there) and are found by `smdm.kernels._build.source_dir()` ($SMDM_CSRC overrides); they
are built into a user cache ($SMDM_CACHE_DIR or
$XDG_CACHE_HOME/smdm/kernels/<hash>) under a file lock; with no CUDA toolkit they compile through NVRTC
(CuPy). `SMDM_KERNEL_BUILD=auto|nvcc|nvrtc` chooses the build path (auto: nvcc when a toolkit is found,
else NVRTC; nvcc: no NVRTC fallback; nvrtc: NVRTC even where nvcc exists).

Sampler arithmetic: the kernel and `unmask_step_reference` agree bit for bit on tokens, confidences and
commits. Where docs/CONTRACTS.md leaves freedom we fixed it as follows (both sides implement exactly this):
  * log / exp are the op sequences `log_f32` / `exp_neg_f32` (a few ulp from libm), not libm's;
  * top-p uses the distribution softmax(l) of the top-k-filtered guided logits before temperature, with
    each entry's mass floor(exp(l - max) 2^31) summed exactly as integers;
  * confidence normaliser S = sum floor(exp(l - max) 2^31) 2^-31 (relative difference from the float sum
    below 1.5e-5 for a 32000-entry vocabulary); prob = exp(l_tok - max) / S,
    margin = (1 - exp(l_2 - max)) / S,
    neg_entropy = (sum_v exp(z_v) z_v) / S - log S with z = l - max (the sum in 31-bit fixed point).
  * Gumbel noise u = ((h >> 41) + 0.5) * 2^-23: k + 0.5 is exact in float32, so u is strictly inside (0, 1)
    and g = -log(-log(u)) is finite (an earlier 24-bit form rounded to u == 1, g == +inf, for one h in 2^24).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from smdm.kernels._build import KernelBuildError, check_sources, source_dir
from smdm.kernels._reference import (
    CONFIDENCE_MODES,
    attention_reference,
    choose_tokens_reference,
    exp_neg_f32,
    gumbel_noise,
    log_f32,
    select_positions_reference,
    unmask_step_reference,
)

__all__ = [
    "KernelBuildError",
    "attention",
    "attention_reference",
    "available",
    "build",
    "check_sources",
    "choose_tokens",
    "choose_tokens_reference",
    "exp_neg_f32",
    "gumbel_noise",
    "log_f32",
    "register",
    "select_positions",
    "select_positions_reference",
    "source_dir",
    "unmask_step",
    "unmask_step_reference",
]

BACKENDS = ("auto", "cuda", "reference")
_warned_fallback = False


def build(verbose: bool = False):
    """Build (or load from the cache) the CUDA kernel module; raises KernelBuildError with the reason."""
    from smdm.kernels import _build

    return _build.load(verbose=verbose)


def available() -> bool:
    """True when backend="auto" will use the CUDA kernels here: a GPU, a successful build, and SMDM_KERNELS not
    set to "reference" (a bad SMDM_KERNELS or SMDM_KERNEL_BUILD value raises ValueError)."""
    if _env_backend() == "reference":
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        build()
        return True
    except KernelBuildError:
        return False


def _env_backend() -> str:
    env = os.environ.get("SMDM_KERNELS", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"SMDM_KERNELS must be one of {BACKENDS}, got {env!r}")
    return env


def _resolve_backend(backend: str, is_cuda: bool, unsupported: str | None) -> str:
    """'cuda' or 'reference' for this call; `unsupported` is why the kernel cannot take it (or None).
    While torch.compile traces, nothing is built: a call the kernel may take resolves to the requested
    backend ('auto' or 'cuda'), which the op `torch.ops.smdm.*` resolves again (building) when it runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    env = _env_backend()
    if backend == "auto":
        backend = env
    if backend == "reference":
        return "reference"
    if backend == "cuda":
        if not is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors")
        if unsupported:
            raise ValueError(f"backend='cuda' cannot run this call: {unsupported}")
    elif not is_cuda or unsupported:
        return "reference"
    import torch

    if torch.compiler.is_compiling():  # tracing: no build here (the op builds, or falls back, when it runs)
        return backend
    if backend == "cuda":
        build()  # raises KernelBuildError: never a silent fallback when the kernel was asked for
        return "cuda"
    try:
        build()
    except KernelBuildError as e:
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                f"smdm CUDA kernels unavailable, using the PyTorch reference: {e}",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    return "cuda"


# ----------------------------------------------------------------------------------------------------------
# fused unmasking step
# ----------------------------------------------------------------------------------------------------------
def _check_unmask_args(
    logits,
    tokens,
    candidates,
    seeds,
    uncond_logits,
    temperature,
    top_k,
    top_p,
    confidence,
    n_commit,
    threshold,
):
    import torch

    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a (B, L, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, L, V = logits.shape
    if V < 1:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if uncond_logits is not None:
        if uncond_logits.shape != logits.shape:
            raise ValueError(
                f"uncond_logits shape {tuple(uncond_logits.shape)} != logits shape {tuple(logits.shape)}"
            )
        if uncond_logits.dtype != logits.dtype:
            raise TypeError(f"uncond_logits dtype {uncond_logits.dtype} != logits dtype {logits.dtype}")
        if uncond_logits.device != logits.device:
            raise ValueError(f"uncond_logits is on {uncond_logits.device}, logits on {logits.device}")
    for name, t, dtype, shape in (
        ("tokens", tokens, torch.int64, (B, L)),
        ("candidates", candidates, torch.bool, (B, L)),
        ("seeds", seeds, torch.int64, (B,)),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    s0, s1 = abs(tokens.stride(0)), abs(tokens.stride(1))
    if (L > 1 and s1 == 0) or (B > 1 and L > 0 and s0 < L * max(s1, 1)):
        # e.g. an expand()ed row: the kernel's writes to shared elements would race (the reference raises too)
        raise ValueError(f"tokens rows overlap in memory (strides {tuple(tokens.stride())} for shape {(B, L)})")
    if (n_commit is None) == (threshold is None):
        raise ValueError("give exactly one of n_commit (count mode) and threshold (threshold mode)")
    if n_commit is not None:
        if (
            not isinstance(n_commit, torch.Tensor)
            or n_commit.dtype != torch.int64
            or tuple(n_commit.shape) != (B,)
        ):
            raise TypeError(f"n_commit must be an int64 tensor of shape ({B},)")
        if n_commit.device != logits.device:
            raise ValueError(f"n_commit is on {n_commit.device}, logits on {logits.device}")
    elif not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if confidence not in CONFIDENCE_MODES:
        raise ValueError(f"confidence must be one of {tuple(CONFIDENCE_MODES)}, got {confidence!r}")


def unmask_step(
    logits,
    tokens,
    candidates,
    seeds,
    step: int,
    *,
    uncond_logits=None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    confidence: str = "prob",
    n_commit=None,
    threshold: float | None = None,
    position_offset: int = 0,
    backend: str = "auto",
):
    """One unmasking step of an MDM sampler, fused (docs/CONTRACTS.md "Sampler token choice").

    logits          (B, L, V) float32/bf16/fp16 conditional logits of the positions in `tokens`
    tokens          (B, L) int64, updated in place at the committed positions (unit stride along L; a
                    column slice `x[:, a:b]` of a longer buffer works, with position_offset=a)
    candidates      (B, L) bool: positions that may be committed (masked and inside the current block)
    seeds           (B,) int64 per-sequence seeds; step: the sampler step (both key the Gumbel noise)
    uncond_logits   optional (B, L, V) logits of the unconditional input; guided l = u + (w + 1)(c - u)
    cfg_scale       w (0 = conditional logits only, exactly as without uncond_logits... up to rounding)
    temperature     0 = argmax, else Gumbel-max of l / T; top_k (0 = off), top_p (1 = off) filter l first
    confidence      "prob" | "margin" | "neg_entropy"
    n_commit        (B,) int64: commit the n most confident candidates per sequence (count mode), or
    threshold       commit every candidate with confidence >= threshold, plus the most confident one
    position_offset absolute position of column 0 (the Gumbel key uses the position in the full row)
    Returns (pred (B, L) int64, -1 off candidates; conf (B, L) float32, -inf off candidates;
    committed (B, L) bool).
    """
    _check_unmask_args(
        logits,
        tokens,
        candidates,
        seeds,
        uncond_logits,
        temperature,
        top_k,
        top_p,
        confidence,
        n_commit,
        threshold,
    )
    B, L, V = logits.shape
    unsupported = None
    if L > 1 and tokens.stride(1) != 1:
        unsupported = "tokens needs unit stride along positions"
    elif not logits.is_contiguous() or (uncond_logits is not None and not uncond_logits.is_contiguous()):
        unsupported = "logits must be contiguous"
    elif not candidates.is_contiguous() or not seeds.is_contiguous():
        unsupported = "candidates and seeds must be contiguous"
    elif logits.is_cuda:
        unsupported = _smem_unsupported(logits, max(V, L), "max(V, L)")
    import torch

    which = _resolve_backend(backend, logits.is_cuda, unsupported)
    if which == "reference" and not torch.compiler.is_compiling():  # traced: the op (no data-dependent shapes)
        return unmask_step_reference(
            logits,
            tokens,
            candidates,
            seeds,
            step,
            uncond_logits=uncond_logits,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            confidence=confidence,
            n_commit=n_commit,
            threshold=threshold,
            position_offset=position_offset,
        )
    from smdm.kernels import _ops  # noqa: F401  (registers torch.ops.smdm.*)

    return torch.ops.smdm.unmask_step(
        logits,
        uncond_logits,
        candidates,
        seeds,
        tokens,
        None if n_commit is None else n_commit.contiguous(),  # the launcher reads it as a flat array
        int(step),
        int(position_offset),
        float(cfg_scale),
        float(temperature),
        int(top_k),
        float(top_p),
        CONFIDENCE_MODES[confidence],
        0.0 if threshold is None else float(threshold),
        which,
    )


UNMASK_MAX_N = 65536  # = smdm::UNMASK_MAX_N: longest row (V) / sequence (L) of the sampler kernels


def _smem_unsupported(t, n: int, what: str) -> str | None:
    import torch

    if n > UNMASK_MAX_N:
        return f"{what}={n} exceeds the sampler kernels' limit of {UNMASK_MAX_N}"
    limit = torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin
    return (
        f"{what}={n} needs {n * 4 + 2720} bytes of shared memory per block, the GPU has {limit}"
        if (n * 4 + 2720 > limit)
        else None
    )


def choose_tokens(
    logits,
    *,
    seeds,
    positions,
    step,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    confidence: str = "prob",
    backend: str = "auto",
):
    """Token and confidence per row of already-guided logits (N, V) float32/bf16/fp16 — the row part of
    `unmask_step`, with the signature of `smdm.sampling.choose_tokens` (seeds, positions, step: ints or (N,)
    int64 tensors on any device). Returns tokens (N,) int64 and confidence (N,) float32."""
    import torch

    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be an (N, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    N, V = logits.shape
    if confidence not in CONFIDENCE_MODES:
        raise ValueError(f"confidence must be one of {tuple(CONFIDENCE_MODES)}, got {confidence!r}")
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    top_k = 0 if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    if not (0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 or None = off), got {top_k}")

    def col(name, x):
        t = torch.as_tensor(x)
        if t.dtype not in (torch.int64, torch.int32) or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != N):
            raise ValueError(f"{name} must be an int or an integer tensor of shape ({N},), got {x!r:.80}")
        return t.to(device=logits.device, dtype=torch.int64).expand(N).contiguous()

    seeds, positions, steps = col("seeds", seeds), col("positions", positions), col("step", step)
    unsupported = None
    if not logits.is_contiguous():
        unsupported = "logits must be contiguous"
    elif logits.is_cuda:
        unsupported = _smem_unsupported(logits, V, "V")
    which = _resolve_backend(backend, logits.is_cuda, unsupported)
    if which == "reference" and not torch.compiler.is_compiling():
        return choose_tokens_reference(
            logits,
            seeds=seeds,
            positions=positions,
            step=steps,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            confidence=confidence,
        )
    from smdm.kernels import _ops  # noqa: F401

    return torch.ops.smdm.choose_tokens(
        logits,
        seeds,
        positions,
        steps,
        float(temperature),
        int(top_k),
        float(top_p),
        CONFIDENCE_MODES[confidence],
        which,
    )


def select_positions(confidence, candidates, n=None, threshold: float | None = None, backend: str = "auto"):
    """Which candidates to commit per row (the commit part of `unmask_step`, signature of
    `smdm.sampling.select_positions`): confidence (B, P) float32, candidates (B, P) bool; count mode `n`
    (int or (B,) tensor): the n most confident (ties: lower position); threshold mode: confidence >= threshold
    plus the most confident one. Returns (B, P) bool."""
    import torch

    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 2:
        raise ValueError(
            f"confidence must be a (B, P) tensor, got {getattr(confidence, 'shape', type(confidence))}"
        )
    B, P = confidence.shape
    if (
        not isinstance(candidates, torch.Tensor)
        or candidates.dtype != torch.bool
        or candidates.shape != (B, P)
    ):
        raise ValueError(f"candidates must be a bool tensor of shape ({B}, {P})")
    if (n is None) == (threshold is None):
        raise ValueError("select_positions needs exactly one of n (count mode) and threshold")
    if n is not None:
        n = torch.as_tensor(n, dtype=torch.int64).to(confidence.device).expand(B).contiguous()
    conf32 = confidence.to(torch.float32).contiguous()
    candidates = candidates.to(confidence.device).contiguous()
    unsupported = _smem_unsupported(confidence, P, "P") if confidence.is_cuda else None
    which = _resolve_backend(backend, confidence.is_cuda, unsupported)
    if which == "reference" and not torch.compiler.is_compiling():
        return select_positions_reference(conf32, candidates, n, threshold)
    from smdm.kernels import _ops  # noqa: F401

    return torch.ops.smdm.select_positions(
        conf32, candidates, n, 0.0 if threshold is None else float(threshold), which
    )


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------
def attention(
    q,
    k,
    v,
    *,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_ids=None,
    scale: float | None = None,
    backend: str = "auto",
):
    """Bidirectional attention forward: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D).

    Document masking: query i attends to key j only when q_segment_ids[b, i] == k_segment_ids[b, j]
    ((B, Lq) / (B, Lk) int32; `segment_ids` sets both when Lq == Lk). Lk may exceed Lq (queries of a block
    attending to cached prefix K/V and themselves: give k/v as the concatenation). Grouped-query attention
    when Hq is a multiple of Hkv. The kernel takes bf16/fp16, head dim 64 or 128, last dim contiguous.
    """
    import torch

    if segment_ids is not None:
        if q_segment_ids is not None or k_segment_ids is not None:
            raise ValueError("give segment_ids or q_segment_ids/k_segment_ids, not both")
        q_segment_ids = k_segment_ids = segment_ids
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, D) tensor, got {getattr(t, 'shape', type(t))}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on the same device")
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("give both q_segment_ids and k_segment_ids, or neither")
    if q_segment_ids is not None:
        for name, t, n in (
            ("q_segment_ids", q_segment_ids, Lq),
            ("k_segment_ids", k_segment_ids, k.shape[2]),
        ):
            if tuple(t.shape) != (B, n):
                raise ValueError(f"{name} must have shape ({B}, {n}), got {tuple(t.shape)}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    why = _attention_unsupported(q, k, v)
    if why is None and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # the kernel is forward only (no autograd formula): "auto" takes the differentiable reference, and an
        # explicit backend="cuda" is refused by _resolve_backend with this reason, not at backward()
        why = "the kernel is forward only and q/k/v require grad (run it under torch.no_grad(), or train with sdpa)"
    which = _resolve_backend(backend, q.is_cuda, why)
    if which == "reference":
        return attention_reference(
            q, k, v, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, scale=scale
        )
    from smdm.kernels import _ops  # noqa: F401

    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.to(torch.int32).contiguous()
        k_segment_ids = k_segment_ids.to(torch.int32).contiguous()
    return torch.ops.smdm.attention(q, k, v, q_segment_ids, k_segment_ids, scale, which)


ALIGNMENT_MESSAGE = "q/k/v need a contiguous last dim and 16-byte aligned rows"


def _attention_unsupported(q, k, v) -> str | None:
    """Why the attention kernel cannot take q/k/v (or None). The start addresses are not known while
    torch.compile traces: the op `torch.ops.smdm.attention` checks them again when it runs."""
    import torch

    B, Hq, Lq, D = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (the kernel takes bfloat16 or float16)"
    if D not in (64, 128):
        return f"head dim {D} (the kernel takes 64 or 128)"
    if k.shape[2] == 0:
        return "no keys"
    if B > 65535 or Hq > 65535:  # grid (ceil(Lq / 64), Hq, B): gridDim.y and .z are at most 65535
        return f"batch {B} or heads {Hq} above 65535"
    if max(Lq, k.shape[2]) >= 2**31:
        return "sequence length >= 2^31"
    if any(t.stride(3) != 1 or any(s % 8 for s in t.stride()[:3]) for t in (q, k, v)):
        return ALIGNMENT_MESSAGE
    return None if torch.compiler.is_compiling() else _misaligned(q, k, v)


def _misaligned(q, k, v) -> str | None:
    """The one check of `_attention_unsupported` that needs the start addresses: the op repeats only this one
    when it runs (the static checks were made when the call was traced, or eagerly)."""
    return ALIGNMENT_MESSAGE if any(t.data_ptr() % 16 for t in (q, k, v)) else None


# ----------------------------------------------------------------------------------------------------------
# command line: smdm kernels check | build | sass
# ----------------------------------------------------------------------------------------------------------
def register(parser: argparse.ArgumentParser, name: str = "kernels") -> None:
    """Add `check`, `build` and `sass` under `smdm kernels` (called by smdm.cli)."""
    sub = parser.add_subparsers(dest="kernels_command", metavar="ACTION")
    p = sub.add_parser("check", help="compile every CUDA source without a GPU (nvcc -c and NVRTC)")
    p.add_argument("--arch", action="append", help="architectures (default: sm_90a sm_80 sm_89)")
    p.add_argument(
        "--no-launchers", action="store_true", help="only the kernel headers (fast; no torch headers)"
    )
    p.add_argument("--no-nvrtc", action="store_true", help="skip the NVRTC compile")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiler processes")
    p.add_argument("--verbose", action="store_true", help="print the compiler logs")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("build", help="build the kernels for the visible GPU into the cache")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("sass", help="disassemble the kernels and count tensor-core (HMMA) instructions (no GPU "
                       "needed; needs nvcc and cuobjdump: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    p.add_argument("--arch", default="sm_90a")
    p.set_defaults(func=_cmd_sass)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _cmd_check(args) -> int:
    from smdm.kernels._build import CHECK_ARCHS

    archs = tuple(args.arch) if args.arch else CHECK_ARCHS
    print(f"sources: {source_dir()}")
    results = check_sources(
        archs=archs, launchers=not args.no_launchers, nvrtc=not args.no_nvrtc, jobs=args.jobs
    )
    failed = 0
    for r in results:
        print(f"{r.status():8s} {r.name:32s} {r.tool:28s} {r.seconds:6.1f}s")
        if r.ok is False:
            failed += 1
        if args.verbose or r.ok is False:
            print("    " + r.log.replace("\n", "\n    "))
    print(
        f"{sum(r.ok is True for r in results)} ok, {failed} failed, "
        f"{sum(r.ok is None for r in results)} skipped"
    )
    return 1 if failed else 0


def _cmd_build(args) -> int:
    try:
        mod = build(verbose=args.verbose)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built: {getattr(mod, '__file__', type(mod).__name__)}")
    return 0


def _cmd_sass(args) -> int:
    from smdm.kernels._build import disassemble_mma

    try:
        counts = disassemble_mma(args.arch)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for fn, c in sorted(counts.items()):
        print(f"{c['HMMA']:5d} HMMA {c['LDSM']:5d} LDSM {c['LDGSTS']:5d} LDGSTS  {fn}")
    return 0
