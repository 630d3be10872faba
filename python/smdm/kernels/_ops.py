"""torch.library registrations of the smdm kernels (`torch.ops.smdm.unmask_step`, `torch.ops.smdm.attention`).

Each op has a fake (meta) implementation so `torch.compile` traces it without running it. The real
implementation runs the CUDA kernel for CUDA tensors and the PyTorch reference otherwise (so the ops work, and
can be opchecked, on CPU). Outputs are allocated here, in Python.

The last argument, `backend`, is the backend the public function resolved ("cuda" by default: the kernel,
building it on first use, errors raised): under torch.compile the public functions pass "auto" (nothing was
built while tracing), and the op makes the eager choice when it runs: build, and on a failed build or an
unsupported call (attention: a q/k/v start address not 16-byte aligned) the reference instead, with the eager
warning. "reference" runs the reference on any device (how compiled sampler calls avoid tracing into it).

The reference branches return contiguous tensors, as the fake implementations and the kernel branches do:
a reference result takes its strides from its inputs (`candidates & ...` of a transposed `candidates` is
transposed), and under torch.compile inductor asserts every custom-op output against the fake's strides.

No `from __future__ import annotations` here: torch.library infers the op schema from the annotations.
"""

from typing import Optional, Tuple

import torch

from smdm.kernels import _build
from smdm.kernels._reference import (
    attention_reference,
    choose_tokens_reference,
    select_positions_reference,
    unmask_step_reference,
)

_CONF_NAMES = ("prob", "margin", "neg_entropy")


def _contiguous(*ts: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in ts)


def _use_kernel(backend: str, is_cuda: bool, unsupported: Optional[str] = None) -> bool:
    """Run-time choice of one op call: True for the kernel (built), False for the reference. "cuda" raises
    (KernelBuildError, or ValueError for an unsupported call) instead of falling back."""
    if not is_cuda or backend == "reference":
        return False
    from smdm import kernels

    return kernels._resolve_backend(backend, True, unsupported) == "cuda"


@torch.library.custom_op("smdm::unmask_step", mutates_args=("tokens",))
def unmask_step_op(
    logits: torch.Tensor,
    uncond_logits: Optional[torch.Tensor],
    candidates: torch.Tensor,
    seeds: torch.Tensor,
    tokens: torch.Tensor,
    n_commit: Optional[torch.Tensor],
    step: int,
    position_offset: int,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    conf_mode: int,
    threshold: float,
    backend: str = "cuda",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, _ = logits.shape
    if not _use_kernel(backend, logits.is_cuda):
        return _contiguous(
            *unmask_step_reference(
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
                confidence=_CONF_NAMES[conf_mode],
                n_commit=n_commit,
                threshold=None if n_commit is not None else threshold,
                position_offset=position_offset,
            )
        )
    pred = torch.empty((B, L), dtype=torch.int64, device=logits.device)
    conf = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    committed = torch.empty((B, L), dtype=torch.bool, device=logits.device)
    _build.load().unmask_step(
        logits,
        uncond_logits,
        candidates,
        seeds,
        step,
        position_offset,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        conf_mode,
        n_commit,
        threshold,
        tokens,
        pred,
        conf,
        committed,
    )
    return pred, conf, committed


@unmask_step_op.register_fake
def _unmask_step_fake(
    logits,
    uncond_logits,
    candidates,
    seeds,
    tokens,
    n_commit,
    step,
    position_offset,
    cfg_scale,
    temperature,
    top_k,
    top_p,
    conf_mode,
    threshold,
    backend="cuda",
):
    B, L, _ = logits.shape
    return (
        logits.new_empty((B, L), dtype=torch.int64),
        logits.new_empty((B, L), dtype=torch.float32),
        logits.new_empty((B, L), dtype=torch.bool),
    )


@torch.library.custom_op("smdm::choose_tokens", mutates_args=())
def choose_tokens_op(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    steps: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    conf_mode: int,
    backend: str = "cuda",
) -> Tuple[torch.Tensor, torch.Tensor]:
    if not _use_kernel(backend, logits.is_cuda):
        return _contiguous(
            *choose_tokens_reference(
                logits,
                seeds=seeds,
                positions=positions,
                step=steps,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                confidence=_CONF_NAMES[conf_mode],
            )
        )
    N = logits.shape[0]
    tokens = torch.empty((N,), dtype=torch.int64, device=logits.device)
    conf = torch.empty((N,), dtype=torch.float32, device=logits.device)
    _build.load().choose_tokens(
        logits, seeds, positions, steps, temperature, top_k, top_p, conf_mode, tokens, conf
    )
    return tokens, conf


@choose_tokens_op.register_fake
def _choose_tokens_fake(logits, seeds, positions, steps, temperature, top_k, top_p, conf_mode, backend="cuda"):
    N = logits.shape[0]
    return logits.new_empty((N,), dtype=torch.int64), logits.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("smdm::select_positions", mutates_args=())
def select_positions_op(
    confidence: torch.Tensor,
    candidates: torch.Tensor,
    n: Optional[torch.Tensor],
    threshold: float,
    backend: str = "cuda",
) -> torch.Tensor:
    if not _use_kernel(backend, confidence.is_cuda):
        ref = select_positions_reference(confidence, candidates, n, None if n is not None else threshold)
        return ref.contiguous()
    committed = torch.empty(confidence.shape, dtype=torch.bool, device=confidence.device)
    _build.load().select_positions(confidence, candidates, n, threshold, committed)
    return committed


@select_positions_op.register_fake
def _select_positions_fake(confidence, candidates, n, threshold, backend="cuda"):
    return confidence.new_empty(confidence.shape, dtype=torch.bool)


@torch.library.custom_op("smdm::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segment_ids: Optional[torch.Tensor],
    k_segment_ids: Optional[torch.Tensor],
    scale: float,
    backend: str = "cuda",
) -> torch.Tensor:
    # only the 16-byte alignment of the start addresses (unknown while tracing) is checked again here
    from smdm.kernels import _misaligned

    if not _use_kernel(backend, q.is_cuda, _misaligned(q, k, v) if q.is_cuda else None):
        ref = attention_reference(q, k, v, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, scale=scale)
        return ref.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _build.load().attention(q, k, v, q_segment_ids, k_segment_ids, out, scale)
    return out


@attention_op.register_fake
def _attention_fake(q, k, v, q_segment_ids, k_segment_ids, scale, backend="cuda"):
    return q.new_empty(q.shape)
