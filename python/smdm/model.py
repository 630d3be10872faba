"""The Transformer of SMDM / TinyLlama, bidirectional for the MDM and causal for its autoregressive twin.

Design choices (DESIGN §3), all in this one file:
- pre-RMSNorm (eps 1e-5) blocks; multi-head attention with optional grouped-query heads (n_kv_head);
- GPT-NeoX (half-split) rotary embeddings, base 10000, over the full head dimension;
- SwiGLU MLP `w3(silu(w1 x) * w2 x)`; no biases anywhere; final RMSNorm; untied output head;
- MDM: bidirectional attention, no timestep input; the embedding has `vocab_size + 1` rows and the mask token
  id is `vocab_size`; the head outputs `vocab_size` logits (never the mask).
- ARM twin: the same code with `causal=True`, `vocab_size` embedding rows, and a static KV cache for generation;
- SMDM initialisation: embeddings and linears N(0, sqrt(2 / (5 d))); attention output projection and SwiGLU w3
  N(0, 1 / (sqrt(d) L)).

One attention path serves training and sampling: optional document masking (`segment_ids`, packed sequences
attend only within their document), key validity (`key_valid`, padding of ragged batches) and a static KV cache
(`KVCache`: the ARM's generation cache, and the MDM's prefix cache of finished blocks).

Attention implementation (`model.attention`, a run option like checkpointing): "auto" runs smdm's fused
bidirectional flash-attention kernel (`smdm.kernels.attention`, DESIGN §7) for the MDM's inference on CUDA in
bf16/fp16 with head dim 64 or 128 when the kernels build (sampling, likelihoods: no gradients), and PyTorch's SDPA
everywhere else (training keeps SDPA's backward; the ARM twin is causal). Document masking, key validity and
the prefix cache become segment ids for the kernel: query i sees key j iff their segment ids are equal, and an
invalid key gets id -1. "sdpa" always uses SDPA; "fused" always calls `smdm.kernels.attention` (its PyTorch
reference off CUDA, or under SMDM_KERNELS=reference: what the CPU tests use to check this translation).
SMDM_KERNELS=reference keeps "auto" on SDPA; SMDM_KERNELS=cuda makes "auto" demand the kernel (an error when
it cannot be built, never a silent fallback).
"flex" runs PyTorch's FlexAttention (`torch.nn.attention.flex_attention`) forward and backward whenever there is
a mask (segment ids and/or key validity; causal within documents for the ARM) and no KV cache: the packed
training windows of `smdm train`. SDPA with a dense (B, 1, L, L) boolean mask cannot use its flash backend and
computes every tile; FlexAttention takes a block mask (`create_block_mask`, built once per forward pass and
shared by the layers) and skips the tiles where no query sees any key. Without a mask "flex" is plain SDPA (no
mask already means the flash backend, `is_causal` for the ARM), and with a KV cache SDPA with the dense mask.
Grouped-query heads go to FlexAttention as they are (`enable_gqa`). On CUDA the call is
`torch.compile(flex_attention)` (compiled at first use, one per process: compiling is what makes it a fused
kernel); elsewhere it is FlexAttention's eager implementation, which materialises the scores like SDPA with a
dense mask, and which PyTorch refuses to differentiate on the CPU (checked in torch 2.11 and 2.15): "flex"
trains on CUDA only (an error on the CPU when gradients are needed; its forward runs everywhere).
A query that may see no key at all gets zeros (SDPA: NaN). "auto" never picks "flex" (not measured on a GPU yet).

Activation checkpointing (`Transformer(config, activation_checkpointing=True)`, or set the attribute): while
gradients are recorded (and no KV cache is passed), each block keeps only its input and recomputes its
activations in backward (`torch.utils.checkpoint`, non-reentrant). The blocks draw no random numbers (no
dropout), so the recomputation is the same computation and the gradients are unchanged.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int  # Transformer blocks
    n_head: int  # query heads
    d_model: int  # residual width
    d_ff: int  # SwiGLU hidden width (the "intermediate size")
    vocab_size: int = 32000  # real tokens; the MDM adds one mask token with id == vocab_size
    n_kv_head: Optional[int] = None  # key/value heads for grouped-query attention (None: = n_head)
    max_seq_len: int = 2048  # context length (RoPE table size)
    causal: bool = False  # False: MDM (bidirectional); True: the autoregressive twin
    rope_base: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ValueError(f"ModelConfig.n_kv_head must be >= 1 (or None), got {self.n_kv_head}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} (d_model / n_head) must be even: RoPE rotates pairs")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mask_id(self) -> Optional[int]:
        """The mask token id of the MDM (None for the autoregressive twin)."""
        return None if self.causal else self.vocab_size

    @property
    def n_embed_rows(self) -> int:
        return self.vocab_size + (0 if self.causal else 1)

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and the head (the paper's model size).

        For full multi-head attention this is L (4 d^2 + 3 d I + 2 d) + d (DESIGN §3)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_head + 2 * self.kv_heads) * hd + d * d
        return self.n_layer * (attn + 3 * d * self.d_ff + 2 * d) + d

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's family, named by non-embedding parameters: name -> (layers, heads, width, ffn).
NAMED_SIZES = {
    "6M": (6, 4, 256, 1024), "19M": (8, 6, 384, 1536), "34M": (8, 8, 512, 2048), "48M": (9, 9, 576, 2304),
    "66M": (10, 10, 640, 2560), "85M": (13, 10, 640, 2560), "113M": (12, 12, 768, 3072),
    "142M": (15, 12, 768, 3072), "170M": (18, 12, 768, 3072), "180M": (14, 14, 896, 3584),
    "206M": (16, 14, 896, 3584), "231M": (18, 14, 896, 3584), "268M": (16, 16, 1024, 4096),
    "302M": (18, 16, 1024, 4096), "336M": (20, 16, 1024, 4096), "472M": (18, 10, 1280, 5120),
    "551M": (21, 10, 1280, 5120), "571M": (18, 11, 1408, 5632), "629M": (24, 10, 1280, 5120),
    "666M": (21, 11, 1408, 5632), "717M": (19, 12, 1536, 6144), "761M": (24, 11, 1408, 5632),
    "831M": (22, 12, 1536, 6144), "944M": (25, 12, 1536, 6144), "1028M": (20, 14, 1792, 7168),
    "1233M": (24, 14, 1792, 7168), "1476M": (22, 16, 2048, 8192), "1678M": (25, 16, 2048, 8192),
    "2121M": (28, 17, 2176, 8704),
}
# Tiny configs for CPU tests and the demo (not part of the paper's family).
TINY_SIZES = {
    "tiny": (2, 2, 64, 192),  # tests
    "demo": (4, 4, 128, 512),  # the CPU demo of `smdm train`
    "small": (6, 6, 384, 1024),
}
ALIASES = {"1.1B": "1028M"}


SIZE_SPEC = re.compile(r"L(\d+)-H(\d+)-D(\d+)(?:-F(\d+))?", re.IGNORECASE)


def parse_size(name: str) -> tuple:
    """(layers, heads, width, ffn) of a named size (NAMED_SIZES, TINY_SIZES, ALIASES) or of a spelled-out
    one, "L4-H4-D128-F512" (layers, heads, width, ffn; "-F" left out: ffn = 4 x width)."""
    name = ALIASES.get(name, name)
    table = {**NAMED_SIZES, **TINY_SIZES}
    if name in table:
        return table[name]
    m = SIZE_SPEC.fullmatch(name)
    if m is None:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(table)}, or spelled out as "
                         "L<layers>-H<heads>-D<width>[-F<ffn>] (e.g. L4-H4-D128-F512)")
    n_layer, n_head, d_model = (int(g) for g in m.groups()[:3])
    d_ff = int(m.group(4)) if m.group(4) else 4 * d_model
    if min(n_layer, n_head, d_model, d_ff) < 1 or d_model % n_head or (d_model // n_head) % 2:
        raise ValueError(f"model config {name!r}: sizes must be >= 1 and the width {d_model} a multiple of the "
                         f"{n_head} heads with an even head dimension (RoPE rotates pairs)")
    return n_layer, n_head, d_model, d_ff


def config_by_name(name: str, vocab_size: int = 32000, causal: bool = False, **overrides) -> ModelConfig:
    """A named config: one of NAMED_SIZES (e.g. "170M", "1028M" alias "1.1B") or TINY_SIZES, or a spelled-out
    size "L4-H4-D128-F512" (`parse_size`; context 512 unless given, like the tiny ones)."""
    n_layer, n_head, d_model, d_ff = parse_size(name)
    name = ALIASES.get(name, name)
    max_seq_len = overrides.pop("max_seq_len", 2048 if name in NAMED_SIZES else 512)
    return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=d_ff, vocab_size=vocab_size,
                       causal=causal, max_seq_len=max_seq_len, **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)  # at least float32 (a float64 model stays float64)
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dt)).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for GPT-NeoX RoPE at integer positions (any shape P) -> (P..., head_dim) in `dtype` (float32;
    float64 for a float64 model)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    angles = positions.to(dtype)[..., None] * inv_freq  # (..., hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., hd): half-split layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); cos/sin (B, 1, L, hd). Rotates the two halves of the head dim (GPT-NeoX style)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


class KVCache:
    """A static key/value cache: (B, n_kv_head, max_len, head_dim) per layer, written at explicit slots.

    The ARM twin writes one slot per generated token; the MDM's block sampler writes the prompt and finished
    blocks once and reuses them (an approximation for a bidirectional model: those keys no longer see the
    tokens generated after them)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len


class KernelSegments(NamedTuple):
    """What the fused attention kernel takes instead of a boolean mask: query i of row b sees key j iff
    q[b, i] == k[b, j] ((B, Lq) / (B, Lk) int32, or both None for full attention)."""

    q: Optional[torch.Tensor]
    k: Optional[torch.Tensor]
    backend: str  # smdm.kernels.attention's backend=: "auto" | "cuda" | "reference"


class FlexMask(NamedTuple):
    """What FlexAttention takes instead of a boolean mask: one `BlockMask` (B, 1, L, L) shared by every layer."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask (imported at first use: a 1.5 s import)


ATTENTION_IMPLS = ("auto", "sdpa", "fused", "flex")
_kernels_ok: Optional[bool] = None  # auto mode: did the CUDA kernels build here (asked once per process)
_flex_compiled = None  # torch.compile(flex_attention), made at the first CUDA call (nothing compiles at import)


def _flex_fn(device: torch.device):
    """flex_attention as the "flex" path calls it on `device`: compiled on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled


def _flex_attention(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention (B, H, L, hd) with the block mask of `Transformer._block_mask` (module docstring)."""
    if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError("model.attention='flex' needs CUDA to compute gradients: PyTorch's FlexAttention "
                                  "has no backward on the CPU; use 'sdpa' (or 'auto') there, or run under "
                                  "torch.no_grad()")
    fn = _flex_fn(q.device)
    if torch.compiler.is_compiling() or q.is_cuda:  # traced or compiled: the fused kernel, no warning
        return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():  # eager on purpose off CUDA (module docstring): not torch's advice to compile
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
        return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _kernels_available() -> bool:
    global _kernels_ok
    if _kernels_ok is None:
        from smdm import kernels

        _kernels_ok = kernels.available()
    return _kernels_ok


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.d_model, (c.n_head + 2 * c.kv_heads) * c.head_dim, bias=False)
        self.proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)

    def forward(self, x, cos, sin, mask, *, layer: Optional[int], kv_cache: Optional[KVCache], cache_pos: int):
        c = self.c
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split([c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim],
                                    dim=-1)
        q = q.view(B, L, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, L, c.kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = v.view(B, L, c.kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # write this chunk's keys/values, attend to every slot up to its end
            kv_cache.k[layer][:, :, cache_pos:cache_pos + L] = k.to(kv_cache.k[layer].dtype)
            kv_cache.v[layer][:, :, cache_pos:cache_pos + L] = v.to(kv_cache.v[layer].dtype)
            k = kv_cache.k[layer][:, :, :cache_pos + L].to(q.dtype)
            v = kv_cache.v[layer][:, :, :cache_pos + L].to(q.dtype)
        if isinstance(mask, KernelSegments):  # smdm's fused kernel (bidirectional, grouped-query heads native)
            from smdm import kernels

            y = kernels.attention(q, k, v, q_segment_ids=mask.q, k_segment_ids=mask.k, backend=mask.backend)
            return self.proj(y.transpose(1, 2).reshape(B, L, c.n_head * c.head_dim))
        if isinstance(mask, FlexMask):  # FlexAttention (grouped-query heads native)
            y = _flex_attention(q, k, v, mask.block_mask, enable_gqa=c.kv_heads != c.n_head)  # (B, H, L, hd)
            return self.proj(y.transpose(1, 2).reshape(B, L, c.n_head * c.head_dim))
        if c.kv_heads != c.n_head:  # grouped-query attention: share each K/V head across its query group
            k = k.repeat_interleave(c.n_head // c.kv_heads, dim=1)
            v = v.repeat_interleave(c.n_head // c.kv_heads, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=c.causal and kv_cache is None)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w2 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w3 = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c)
        self.norm2 = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, *, layer, kv_cache, cache_pos, recompute: bool = False):
        if recompute:  # activation checkpointing: keep x only, recompute the block's activations in backward
            # Inside forward (not around the call) so hooks on the block (FSDP2's all-gather, DDP) stay outside
            # the recomputed region and `block.compile()` traces the checkpoint as one region.
            return checkpoint(self._forward, x, cos, sin, mask, layer=layer, kv_cache=kv_cache,
                              cache_pos=cache_pos, use_reentrant=False)
        return self._forward(x, cos, sin, mask, layer=layer, kv_cache=kv_cache, cache_pos=cache_pos)

    def _forward(self, x, cos, sin, mask, *, layer, kv_cache, cache_pos):
        x = x + self.attn(self.norm1(x), cos, sin, mask, layer=layer, kv_cache=kv_cache, cache_pos=cache_pos)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """`model(input_ids) -> logits (B, L, vocab_size)`; see the module docstring for the options."""

    def __init__(self, config: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        # recompute each block in backward instead of keeping its activations (a run option, not part of
        # the architecture: it is not in `config` and not saved with the weights)
        self.activation_checkpointing = activation_checkpointing
        self.attention = "auto"  # "auto" | "sdpa" | "fused" | "flex" (module docstring); a run option like the above
        self.embed = nn.Embedding(config.n_embed_rows, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None):
        """SMDM init: N(0, sqrt(2/(5d))) everywhere, N(0, 1/(sqrt(d) L)) for attention out-proj and SwiGLU w3."""
        d, n_layer = self.config.d_model, self.config.n_layer
        std = math.sqrt(2.0 / (5 * d))
        for name, p in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.w3.weight"):
                p.normal_(0.0, 1.0 / (math.sqrt(d) * n_layer), generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def mask_id(self) -> Optional[int]:
        return self.config.mask_id

    def make_kv_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        p = self.head.weight
        return KVCache(self.config, batch, max_len, device=p.device, dtype=dtype or p.dtype)

    def _fused_backend(self, x: torch.Tensor) -> Optional[str]:
        """The fused kernel's backend for this forward pass, or None for SDPA (module docstring)."""
        impl = self.attention
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if impl in ("sdpa", "flex"):
            return None
        if self.config.causal:
            if impl == "fused":
                raise ValueError("model.attention='fused': the kernel is bidirectional (MDM only)")
            return None
        if impl == "fused":
            return "auto"
        env = os.environ.get("SMDM_KERNELS", "auto").strip().lower()
        if env == "reference" or not x.is_cuda or torch.is_grad_enabled():
            return None
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else self.head.weight.dtype
        if dtype not in (torch.bfloat16, torch.float16) or self.config.head_dim not in (64, 128):
            return None
        if env == "cuda":
            return "cuda"  # demanded: smdm.kernels.attention raises if it cannot build
        return "auto" if _kernels_available() else None

    def _segments(self, B, Lq, Lk, device, *, segment_ids, key_valid, backend) -> KernelSegments:
        """The masks of `_mask` as segment ids for the fused kernel (an invalid key gets -1)."""
        if segment_ids is None and key_valid is None:
            return KernelSegments(None, None, backend)
        if segment_ids is not None:
            if int(segment_ids.min()) < 0:
                raise ValueError("segment_ids must be >= 0 (the fused attention path keeps -1 for padding)")
            q = k = segment_ids.to(torch.int32)
        else:
            q = torch.zeros(B, Lq, dtype=torch.int32, device=device)
            k = torch.zeros(B, Lk, dtype=torch.int32, device=device)
        if key_valid is not None:
            k = torch.where(key_valid, k, torch.full_like(k, -1))
        return KernelSegments(q.contiguous(), k.contiguous(), backend)

    def _block_mask(self, B, L, device, *, segment_ids, key_valid) -> FlexMask:
        """The masks of `_mask` (no KV cache: Lq = Lk = L) as FlexAttention's block mask: `mask_mod` says which
        (query, key) pairs may attend; `create_block_mask` evaluates it once per forward pass and keeps, per
        128 x 128 tile, whether it is empty (skipped), full (no mask_mod call) or partial."""
        from torch.nn.attention.flex_attention import and_masks, create_block_mask

        mods = []
        if segment_ids is not None:  # document masking inside packed windows
            mods.append(lambda b, h, q, k: segment_ids[b, q] == segment_ids[b, k])
        if key_valid is not None:  # padding of ragged batches
            mods.append(lambda b, h, q, k: key_valid[b, k])
        if self.config.causal:
            mods.append(lambda b, h, q, k: q >= k)
        mask_mod = mods[0] if len(mods) == 1 else and_masks(*mods)
        return FlexMask(create_block_mask(mask_mod, B, None, L, L, device=device))

    def _mask(self, B, Lq, Lk, device, *, segment_ids, key_valid, kv_cache, cache_pos):
        """Boolean attention mask (B, 1, Lq, Lk), True = may attend; None when plain SDPA suffices."""
        if segment_ids is None and key_valid is None and kv_cache is None:
            return None
        mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
        if segment_ids is not None:  # document masking inside packed windows
            mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        if key_valid is not None:  # padding of ragged batches: (B, Lk) True = real key
            mask &= key_valid[:, None, None, :]
        if self.config.causal:
            q_slot = torch.arange(Lq, device=device)[:, None] + cache_pos
            mask &= torch.arange(Lk, device=device)[None, :] <= q_slot
        return mask

    def hidden(self, input_ids: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
               segment_ids: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None,
               kv_cache: Optional[KVCache] = None, cache_pos: int = 0) -> torch.Tensor:
        """Final-normed hidden states (B, L, d). Losses apply `self.head` only where they need logits.

        positions: RoPE positions, (L,) or (B, L); default cache_pos + arange(L).
        segment_ids: (B, L) document ids inside packed windows (attention stays within a document).
        key_valid: (B, Lk) bool, False for padding keys (Lk = cache_pos + L with a cache, else L).
        kv_cache / cache_pos: write this chunk's K/V at slots [cache_pos, cache_pos + L) and attend to all slots
        before its end (causally for the ARM)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)} (one sequence: "
                             f"ids[None])")
        B, L = input_ids.shape
        if kv_cache is None and cache_pos:
            raise ValueError("cache_pos needs a kv_cache")
        Lk = cache_pos + L
        if kv_cache is not None and Lk > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} slots, {Lk} requested")
        if positions is None:
            positions = torch.arange(cache_pos, Lk, device=input_ids.device)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds the context length "
                             f"{self.config.max_seq_len}")
        # float32 tables (also under autocast and for bf16 weights), float64 for a float64 model
        rope_dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_base, rope_dtype)
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, L, hd)
        else:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, hd)
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache")
        if key_valid is not None and key_valid.shape != (B, Lk):
            raise ValueError(f"key_valid must have shape {(B, Lk)}, got {tuple(key_valid.shape)}")
        backend = self._fused_backend(input_ids)
        if self.attention == "flex" and kv_cache is None and (segment_ids is not None or key_valid is not None):
            mask = self._block_mask(B, L, input_ids.device, segment_ids=segment_ids, key_valid=key_valid)
        elif backend is None:
            mask = self._mask(B, L, Lk, input_ids.device, segment_ids=segment_ids, key_valid=key_valid,
                              kv_cache=kv_cache, cache_pos=cache_pos)
        else:  # the fused kernel takes segment ids, never a (B, 1, Lq, Lk) mask
            mask = self._segments(B, L, Lk, input_ids.device, segment_ids=segment_ids, key_valid=key_valid,
                                  backend=backend)
        x = self.embed(input_ids)  # (B, L, d)
        # a KV cache is written in forward (sampling): never recompute a block that writes one
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.blocks):
            # the layer index only picks a KV cache slot: without a cache every block gets the same arguments,
            # so `block.compile()` traces one graph for all of them (an int would be specialised per layer
            # and recompiled by torch <= 2.11)
            layer = i if kv_cache is not None else None
            x = block(x, cos, sin, mask, layer=layer, kv_cache=kv_cache, cache_pos=cache_pos, recompute=recompute)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.head(self.hidden(input_ids, **kwargs))  # (B, L, V)


def build_model(config: ModelConfig, seed: int = 0, device=None, activation_checkpointing: bool = False
                ) -> Transformer:
    """A freshly initialised model whose weights depend only on `seed` (not on the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config, activation_checkpointing=activation_checkpointing)
    model.reset_parameters(generator=gen)
    return model.to(device) if device is not None else model


def with_causal(config: ModelConfig, causal: bool) -> ModelConfig:
    """The same architecture as the MDM or as its autoregressive twin."""
    return replace(config, causal=causal)
