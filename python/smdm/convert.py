# smdm convert from-litgpt mdm-1028M.safetensors --out runs/smdm-1028M --tokenizer tokenizer.json
# smdm convert to-litgpt runs/demo-mdm --out demo-mdm-litgpt.safetensors        (tests: tests/test_convert.py)
"""Weights in the lit-gpt / TinyLlama layout of SMDM's released checkpoints, and of litgpt, in and out.

SMDM (and TinyLlama, whose trainer it forks) names the same Llama block as smdm.model differently and packs
the attention projection by key/value group:

    lit-gpt                                        smdm.model
    transformer.wte.weight        (V [+1], d)      embed.weight       (+1 row: the MDM's mask token)
    transformer.h.i.norm_1.weight                  blocks.i.norm1.weight
    transformer.h.i.attn.attn.weight               blocks.i.attn.qkv.weight   (regrouped, see below)
      (or litgpt >= 0.5.5's .attn.qkv.weight, already in smdm's order)
    transformer.h.i.attn.proj.weight               blocks.i.attn.proj.weight
    transformer.h.i.norm_2.weight                  blocks.i.norm2.weight
    transformer.h.i.mlp.swiglu.w1|w2|w3.weight     blocks.i.mlp.w1|w2|w3.weight   (xformers SwiGLU)
      (or .mlp.swiglu.w12 = [w1; w2] packed, or lit-gpt's LLaMAMLP .mlp.fc_1|fc_2|proj)
    transformer.ln_f.weight                        norm.weight
    lm_head.weight                (V, d)           head.weight

The fused QKV rows of lit-gpt (`attn.attn`: SMDM, TinyLlama, litgpt up to 0.5.4) are ordered group by group: for
each of the n_kv key/value heads, its q_per_kv query heads, then its key head, then its value head (each head_dim
rows). smdm orders them [all queries | all keys | all values], query head h belonging to key/value head
h // q_per_kv (the same grouping), and so does litgpt from 0.5.5 on (`attn.qkv`); a file's layout is read from
its keys. All use GPT-NeoX half-split RoPE over the full head dim, RMSNorm eps 1e-5 and w3(silu(w1 x) * w2 x),
so a converted model computes the same function (tests/test_convert.py checks logits against the real litgpt
0.2.0 and 0.5.13 GPT from PyPI, and against an independent lit-gpt-layout forward).

`to-litgpt` writes one of three name sets (`LAYOUTS`): "smdm" (the default) for SMDM's and TinyLlama's own code
(grouped `attn.attn`, xformers `mlp.swiglu.w1|w2|w3`), "litgpt-grouped" for litgpt <= 0.5.4 (grouped
`attn.attn`, `mlp.fc_1|fc_2|proj`) and "litgpt" for litgpt >= 0.5.5 (`attn.qkv`, `mlp.fc_1|fc_2|proj`). An MDM's
embedding keeps its mask row: litgpt's GPT holds it once its `transformer.wte` has V + 1 rows, as SMDM's
TransEncoder has.

The model kind follows the embedding: V + 1 rows (V = the head's rows) is an MDM, V rows its autoregressive
twin. The number of query heads is not in the shapes: `--config NAME`, else the smdm config that `to-litgpt`
records in the file's metadata (with the context, RoPE base and norm eps: a round trip is exact), else the
paper's family is matched by (layers, width, ffn), else `--n-head` must say it. A checkpoint converted in is
a normal smdm checkpoint (weights-only: it cannot be resumed) that `smdm.load`, `smdm generate` and `smdm eval`
read; pass the tokenizer.json the weights were trained with (Llama-2's for SMDM's releases) or generation has
no tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from smdm.model import NAMED_SIZES, TINY_SIZES, ModelConfig, config_by_name

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")
# the fused attention projection: key suffix -> its row order (see the module docstring)
_QKV_KEYS = {"attn.attn.weight": "grouped", "attn.qkv.weight": "q|k|v"}
_PREFIXES = ("_orig_mod.", "module.", "model.")  # torch.compile / DDP / wrapper prefixes seen on saved dicts
DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(ValueError):
    """A file that is not a lit-gpt Llama state dict, or one that does not fit the requested config."""


# ---------------------------------------------------------------------------------------------------------
# reading and writing files


def read_state_dict(path) -> dict:
    """name -> tensor from a .safetensors file or a torch file (.pth/.pt/.bin/.ckpt, loaded with
    weights_only=True; a lit-gpt / Lightning dict `{"model": state_dict, ...}` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle / zip
            raise ConvertError(f"{path}: not a torch state dict that loads with weights_only=True "
                               f"({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: expected a dict of tensors (a model state dict)")
    stripped = True
    while stripped:  # strip wrapper prefixes shared by every key, also nested ones ("module._orig_mod.")
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def read_exported_config(path) -> Optional[dict]:
    """The smdm ModelConfig dict that `export_litgpt` stores in a .safetensors file's metadata (None for other
    files): lets a round trip restore what the shapes do not hold (heads, context, RoPE base, norm eps)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        conf = json.loads(meta["smdm_model"]) if "smdm_model" in meta else None
    except (OSError, ValueError, KeyError):
        return None
    return conf if isinstance(conf, dict) else None


def _save_safetensors_atomic(state: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    from smdm.data import fsync_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------------------
# the layout mapping


def _take(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ConvertError(f"{source}: missing tensor {key!r}")
    return state.pop(key)


def _shape(t: torch.Tensor, shape: tuple, key: str, source: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ConvertError(f"{source}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def qkv_key(state: dict, source: str = "state dict") -> str:
    """The fused QKV tensor's name in this file's blocks: "attn.attn.weight" (grouped per key/value head: SMDM,
    TinyLlama, litgpt <= 0.5.4) or "attn.qkv.weight" ([Q | K | V]: litgpt >= 0.5.5), read from block 0."""
    found = [k for k in _QKV_KEYS if "transformer.h.0." + k in state]
    if len(found) != 1:
        names = " and ".join(repr("transformer.h.0." + k) for k in _QKV_KEYS)
        raise ConvertError(f"{source}: {'both' if found else 'neither'} of {names} "
                           f"({'one layout expected' if found else 'not a lit-gpt Llama state dict?'})")
    return found[0]


def infer_config(state: dict, *, source: str = "state dict", config: Optional[str] = None,
                 n_head: Optional[int] = None, max_seq_len: int = 2048) -> ModelConfig:
    """The smdm ModelConfig of a lit-gpt Llama state dict (see the module docstring for how heads are found)."""
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key not in state:
            raise ConvertError(f"{source}: missing tensor {key!r} (not a lit-gpt Llama state dict?)")
    qkv = "transformer.h.0." + qkv_key(state, source)
    vocab, d = state["lm_head.weight"].shape
    rows = state["transformer.wte.weight"].shape[0]
    if rows not in (vocab, vocab + 1) or state["transformer.wte.weight"].shape[1] != d:
        raise ConvertError(f"{source}: transformer.wte.weight has shape "
                           f"{tuple(state['transformer.wte.weight'].shape)}; with lm_head.weight {(vocab, d)} it "
                           f"must have {vocab + 1} rows (MDM) or {vocab} (autoregressive)")
    causal = rows == vocab
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    mlp = "transformer.h.0.mlp."
    if mlp + "swiglu.w1.weight" in state:
        d_ff = state[mlp + "swiglu.w1.weight"].shape[0]
    elif mlp + "swiglu.w12.weight" in state:
        d_ff = state[mlp + "swiglu.w12.weight"].shape[0] // 2
    elif mlp + "fc_1.weight" in state:
        d_ff = state[mlp + "fc_1.weight"].shape[0]
    else:
        raise ConvertError(f"{source}: no SwiGLU weights in block 0 (looked for {mlp}swiglu.w1/.w12 and "
                           f"{mlp}fc_1)")
    if config is not None:
        try:
            named = config_by_name(config, vocab_size=vocab, causal=causal, max_seq_len=max_seq_len)
        except ValueError as e:
            raise ConvertError(f"--config: {e}") from None
        got = (n_layer, d, d_ff)
        if (named.n_layer, named.d_model, named.d_ff) != got:
            raise ConvertError(f"{source}: (layers, width, ffn) = {got}, but config {config} has "
                               f"{(named.n_layer, named.d_model, named.d_ff)}")
        n_head = n_head or named.n_head
    if n_head is None:
        matches = sorted({h for (nl, h, dm, ff) in {**NAMED_SIZES, **TINY_SIZES}.values()
                          if (nl, dm, ff) == (n_layer, d, d_ff)})
        if len(matches) != 1:
            raise ConvertError(f"{source}: (layers, width, ffn) = {(n_layer, d, d_ff)} is not one of smdm's "
                               f"named sizes; pass --n-head (query heads)")
        n_head = matches[0]
    if d % n_head:
        raise ConvertError(f"{source}: width {d} is not divisible by n_head {n_head}")
    hd = d // n_head
    qkv_rows = state[qkv].shape[0]
    n_kv, rem = divmod(qkv_rows // hd - n_head, 2)
    if qkv_rows % hd or rem or n_kv < 1 or n_head % n_kv:
        raise ConvertError(f"{source}: {qkv} has {qkv_rows} rows, which is not "
                           f"(n_head + 2 n_kv) x head_dim for n_head {n_head} (head_dim {hd}); wrong --n-head?")
    return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, d_ff=d_ff, vocab_size=vocab,
                       n_kv_head=None if n_kv == n_head else n_kv, max_seq_len=max_seq_len, causal=causal)


def from_litgpt(state: dict, config: ModelConfig, *, source: str = "state dict") -> dict:
    """smdm.model state dict of a lit-gpt Llama state dict (exact: only a reordering of rows). Every tensor
    must be used; leftovers (e.g. a KV cache or a timestep embedding this model does not have) are an error."""
    state = dict(state)
    c = config
    hd, n_kv = c.head_dim, c.kv_heads
    q_per_kv = c.n_head // n_kv
    d = c.d_model
    qkv_name = qkv_key(state, source)  # every block in the layout of block 0
    out = {"embed.weight": _shape(_take(state, "transformer.wte.weight", source), (c.n_embed_rows, d),
                                  "transformer.wte.weight", source)}
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"blocks.{i}."
        for src, dst, shape in (("norm_1.weight", "norm1.weight", (d,)), ("norm_2.weight", "norm2.weight", (d,)),
                                ("attn.proj.weight", "attn.proj.weight", (d, c.n_head * hd))):
            out[q + dst] = _shape(_take(state, p + src, source), shape, p + src, source)
        qkv = _shape(_take(state, p + qkv_name, source), ((c.n_head + 2 * n_kv) * hd, d), p + qkv_name, source)
        if _QKV_KEYS[qkv_name] == "grouped":
            g = qkv.reshape(n_kv, q_per_kv + 2, hd, d)  # per group: q_per_kv queries, one key, one value
            qkv = torch.cat([g[:, :q_per_kv].reshape(-1, d), g[:, q_per_kv].reshape(-1, d),
                             g[:, q_per_kv + 1].reshape(-1, d)])
        out[q + "attn.qkv.weight"] = qkv
        for dst, (key, w), shape in zip(("w1", "w2", "w3"), _mlp(state, p, source, c.d_ff, d),
                                        ((c.d_ff, d), (c.d_ff, d), (d, c.d_ff))):
            out[q + f"mlp.{dst}.weight"] = _shape(w, shape, key, source)
    out["norm.weight"] = _shape(_take(state, "transformer.ln_f.weight", source), (d,), "transformer.ln_f.weight",
                                source)
    out["head.weight"] = _shape(_take(state, "lm_head.weight", source), (c.vocab_size, d), "lm_head.weight",
                                source)
    left = sorted(k for k in state if not k.endswith("rope_cache"))
    if left:
        raise ConvertError(f"{source}: {len(left)} tensor(s) this model has no place for, e.g. {left[:4]} "
                           f"(a different architecture, or more layers than config {c.n_layer}?)")
    return out


def _mlp(state: dict, p: str, source: str, d_ff: int, d: int) -> list:
    """[(file tensor name, w1), (.., w2), (.., w3)] of block prefix `p` in any of the three layouts."""
    if p + "mlp.swiglu.w12.weight" in state:  # xformers' packed SwiGLU: [w1; w2]
        key = p + "mlp.swiglu.w12.weight"
        w1, w2 = _shape(state.pop(key), (2 * d_ff, d), key, source).chunk(2, dim=0)
        w3 = p + "mlp.swiglu.w3.weight"
        return [(key, w1), (key, w2), (w3, _take(state, w3, source))]
    if p + "mlp.fc_1.weight" in state:  # lit-gpt's LLaMAMLP: proj(silu(fc_1 x) * fc_2 x)
        names = [p + f"mlp.{w}.weight" for w in ("fc_1", "fc_2", "proj")]
    else:
        names = [p + f"mlp.swiglu.{w}.weight" for w in ("w1", "w2", "w3")]
    return [(k, _take(state, k, source)) for k in names]


# to-litgpt's name sets: layout -> (fused QKV tensor, names of smdm's w1, w2, w3) in a block
LAYOUTS = {
    "smdm": ("attn.attn.weight", ("mlp.swiglu.w1.weight", "mlp.swiglu.w2.weight", "mlp.swiglu.w3.weight")),
    "litgpt-grouped": ("attn.attn.weight", ("mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")),
    "litgpt": ("attn.qkv.weight", ("mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")),
}


def to_litgpt(state: dict, config: ModelConfig, layout: str = "smdm") -> dict:
    """The inverse of `from_litgpt`, in one of the `LAYOUTS` (default: SMDM's own names, xformers SwiGLU)."""
    if layout not in LAYOUTS:
        raise ConvertError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    qkv_name, mlp_names = LAYOUTS[layout]
    c = config
    hd, n_kv = c.head_dim, c.kv_heads
    q_per_kv = c.n_head // n_kv
    d = c.d_model
    out = {"transformer.wte.weight": state["embed.weight"]}
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"blocks.{i}."
        qkv = state[q + "attn.qkv.weight"]  # (n_head + 2 n_kv) hd rows: [Q | K | V]
        if _QKV_KEYS[qkv_name] == "grouped":
            qs, ks, vs = qkv.split([c.n_head * hd, n_kv * hd, n_kv * hd])
            qkv = torch.cat([qs.reshape(n_kv, q_per_kv, hd, d), ks.reshape(n_kv, 1, hd, d),
                             vs.reshape(n_kv, 1, hd, d)], dim=1).reshape(-1, d)
        out.update({p + "norm_1.weight": state[q + "norm1.weight"], p + qkv_name: qkv,
                    p + "attn.proj.weight": state[q + "attn.proj.weight"],
                    p + "norm_2.weight": state[q + "norm2.weight"]})
        out.update({p + name: state[q + f"mlp.{w}.weight"] for name, w in zip(mlp_names, ("w1", "w2", "w3"))})
    out["transformer.ln_f.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["head.weight"]
    return out


# ---------------------------------------------------------------------------------------------------------
# whole-file operations (the CLI)


def import_litgpt(path, out, *, tokenizer=None, config: Optional[str] = None, n_head: Optional[int] = None,
                  max_seq_len: Optional[int] = None, dtype: str = "keep") -> Path:
    """Write an smdm checkpoint `OUT/step-0/` from a lit-gpt weights file; returns the step dir. A file written
    by `export_litgpt` carries its smdm config: unless `config` / `n_head` / `max_seq_len` say otherwise, the
    heads, context, RoPE base and norm eps come from it (where its shapes agree), so a round trip is exact;
    else max_seq_len defaults to 2048."""
    from smdm import checkpoint as ckpt

    path = Path(path)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConvertError(f"--tokenizer {tokenizer}: no such file")
    if ckpt.step_dirs(out):
        raise ConvertError(f"{out} already holds checkpoints; choose an empty --out")
    state = read_state_dict(path)
    saved = read_exported_config(path)
    if saved is not None and config is None and n_head is None:
        n_head = saved.get("n_head")
    cfg = infer_config(state, source=str(path), config=config, n_head=n_head,
                       max_seq_len=max_seq_len or (saved or {}).get("max_seq_len") or 2048)
    if saved is not None:
        fields = ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "causal")
        if all(saved.get(f) == getattr(cfg, f) for f in fields) and saved.get("n_kv_head") in (None, cfg.kv_heads):
            cfg = dataclasses.replace(cfg, rope_base=float(saved.get("rope_base", cfg.rope_base)),
                                      norm_eps=float(saved.get("norm_eps", cfg.norm_eps)))
    weights = from_litgpt(state, cfg, source=str(path))
    if DTYPES[dtype] is not None:
        weights = {k: v.to(DTYPES[dtype]) for k, v in weights.items()}
    if tokenizer is not None:
        _check_tokenizer(tokenizer, cfg)
    kind = "ar" if cfg.causal else "mdm"
    conf = {"model": cfg.to_dict(), "objective": kind, "config_name": config,
            "converted_from": {"path": str(path.resolve()), "format": "lit-gpt"}}
    return ckpt.save(out, 0, model_state=weights, config=conf,
                     train_state={"step": 0, "converted_from": str(path.resolve())}, tokenizer_path=tokenizer)


def _check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    from tokenizers import Tokenizer

    try:
        n = Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ConvertError(f"--tokenizer {tokenizer}: not a tokenizer.json ({e})") from None
    if n > cfg.vocab_size:
        raise ConvertError(f"--tokenizer {tokenizer}: {n} tokens, but the model has only {cfg.vocab_size} "
                           f"outputs (a different tokenizer?)")


def export_litgpt(ckpt_path, out, *, dtype: str = "keep", layout: str = "smdm") -> Path:
    """Write an smdm checkpoint's weights as one lit-gpt-layout .safetensors file: for SMDM's own code by default,
    or for litgpt's GPT (`layout`, see `LAYOUTS`)."""
    from smdm import checkpoint as ckpt

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ConvertError(f"--layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    step_dir = ckpt.resolve(ckpt_path)
    ckpt.verify(step_dir)
    conf = ckpt.read_config(step_dir)
    cfg = ModelConfig(**conf["model"])
    state = to_litgpt(ckpt.load_weights(step_dir), cfg, layout)
    if DTYPES[dtype] is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConvertError(f"--out {out}: the lit-gpt export is a .safetensors file")
    _save_safetensors_atomic(state, out, {"format": "lit-gpt", "layout": layout, "source": str(step_dir),
                                          "smdm_model": json.dumps(cfg.to_dict())})
    return out


def register(parser: argparse.ArgumentParser, name: str = "convert") -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = sub.add_parser("from-litgpt", help="a lit-gpt / SMDM / TinyLlama weights file -> an smdm checkpoint")
    p.add_argument("weights", help=".safetensors or torch (.pth/.pt/.bin) state dict in lit-gpt naming")
    p.add_argument("--out", required=True, help="run dir for the checkpoint (OUT/step-0)")
    p.add_argument("--tokenizer", help="the tokenizer.json the weights were trained with (copied along)")
    p.add_argument("--config", help="smdm size name (e.g. 1028M); default: matched from the shapes")
    p.add_argument("--n-head", type=int, help="query heads (when the shapes match no named size)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context (default: the one an `smdm convert to-litgpt` file records, else 2048)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    p = sub.add_parser("to-litgpt", help="an smdm checkpoint -> one lit-gpt-layout .safetensors file")
    p.add_argument("ckpt", help="run dir or step dir")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    p.add_argument("--layout", choices=list(LAYOUTS), default="smdm",
                   help="smdm: SMDM's / TinyLlama's code (fused QKV grouped per key/value head, xformers SwiGLU "
                        "w1/w2/w3); litgpt-grouped: litgpt <= 0.5.4 (grouped attn.attn, fc_1/fc_2/proj); litgpt: "
                        "litgpt >= 0.5.5 (attn.qkv, fc_1/fc_2/proj)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from smdm import checkpoint as ckpt

    try:
        if args.direction == "from-litgpt":
            step = import_litgpt(args.weights, args.out, tokenizer=args.tokenizer, config=args.config,
                                 n_head=args.n_head, max_seq_len=args.max_seq_len, dtype=args.dtype)
            cfg = ModelConfig(**ckpt.read_config(step)["model"])
            kind = "autoregressive" if cfg.causal else "MDM"
            print(f"{step}: {kind}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), width "
                  f"{cfg.d_model}, ffn {cfg.d_ff}, vocab {cfg.vocab_size}, "
                  f"{cfg.non_embedding_params() / 1e6:.1f}M non-embedding parameters")
        else:
            print(export_litgpt(args.ckpt, args.out, dtype=args.dtype, layout=args.layout))
    except (ConvertError, ckpt.CheckpointError) as e:
        print(f"smdm convert: error: {e}", file=sys.stderr)
        return 2
    return 0
