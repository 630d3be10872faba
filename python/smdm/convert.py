# smdm convert from-litgpt mdm-1028M.safetensors --out runs/smdm-1028M --tokenizer tokenizer.json
# smdm convert to-litgpt runs/demo-mdm --out demo-mdm-litgpt.safetensors        (tests: tests/test_convert.py)
# smdm convert to-hf runs/demo-ar --out demo-ar-hf; smdm convert from-hf DIR --out CKPT  (tests/test_convert_hf.py)
"""Weights in and out: the lit-gpt / TinyLlama layout of SMDM's released checkpoints and of litgpt, and Hugging
Face transformers directories (the second half of this file, "Hugging Face transformers", says how).

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
import contextlib
import dataclasses
import json
import math
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
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if why.startswith("Weights only load failed"):  # torch's paragraph on unsafe loading: not the point
                why = "torch.load(weights_only=True) cannot read it as tensors"
            raise ConvertError(f"{path}: not a torch state dict of tensors ({type(e).__name__}: {why})") from None
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


def _safetensors_metadata(path: Path) -> dict:
    """The string metadata of a .safetensors file ({} for other files or one that cannot be read)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, ValueError):
        return {}


_MISSING = object()


def _field(conf: dict, name: str, path, kind=int, default=_MISSING):
    """Field `name` of a config read from `path`: a positive int (not a float, not a bool) or a positive number
    (`kind` float, returned as a float; also a string that is one: PyYAML reads `1e-5`, with no dot, as a
    string); absent or null: `default`, else an error. Bad values are shown as repr."""
    value = conf.get(name)
    if value is None:
        if default is _MISSING:
            raise ConvertError(f"{path}: missing field {name!r}")
        return default
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # refused below, as given
    number = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
    if not (number and 0 < value < math.inf):
        raise ConvertError(f"{path}: field {name!r} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _fields(conf: dict, path, kinds: dict) -> dict:
    """name -> `_field` of each of `kinds` (name -> int / float), None when absent or null."""
    return {name: _field(conf, name, path, kind, default=None) for name, kind in kinds.items()}


# smdm ModelConfig's number fields, as `_field` checks them in a recorded config (causal is a bool)
_MODEL_FIELDS = {"n_layer": int, "n_head": int, "d_model": int, "d_ff": int, "vocab_size": int, "n_kv_head": int,
                 "max_seq_len": int, "rope_base": float, "norm_eps": float}


def _model_fields(conf: dict, path) -> dict:
    """ModelConfig field -> checked value (None when absent or null) of a recorded smdm model config."""
    causal = conf.get("causal")
    if causal is not None and not isinstance(causal, bool):
        raise ConvertError(f"{path}: field 'causal' must be true or false, got {causal!r}")
    return {**_fields(conf, path, _MODEL_FIELDS), "causal": causal}


def read_exported_config(path) -> Optional[dict]:
    """The smdm ModelConfig fields that `export_litgpt` stores in a .safetensors file's metadata (`_model_fields`:
    field -> value or None; None for files without it): lets a round trip restore what the shapes do not hold
    (heads, context, RoPE base, norm eps). A record that is not a JSON object of valid fields is an error."""
    meta = _safetensors_metadata(Path(path))
    if "smdm_model" not in meta:
        return None
    where = f"{path} (metadata smdm_model)"
    try:
        conf = json.loads(meta["smdm_model"])
    except ValueError:
        conf = None
    if not isinstance(conf, dict):
        raise ConvertError(f"{where}: not a JSON object of smdm model config fields")
    return _model_fields(conf, where)


# litgpt Config fields smdm's model cannot compute unless they hold these values (litgpt's defaults): refused
_LITGPT_FIXED = {"norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "bias": False, "lm_head_bias": False,
                 "parallel_residual": False, "shared_attention_norm": False, "rotary_percentage": 1.0,
                 "rope_condense_ratio": 1, "rope_adjustments": None, "scale_embeddings": False,
                 "post_attention_norm": False, "post_mlp_norm": False, "sliding_window_size": None,
                 "n_expert": 0, "attention_logit_softcapping": None, "final_logit_softcapping": None,
                 "attention_scores_scalar": None}


def read_litgpt_config(path) -> Optional[tuple[Path, dict]]:
    """(file, fields) of the litgpt config saved beside a weights file: `model_config.yaml` (litgpt's
    `save_config`: its Config as a dict) or `lit_config.json` (lit-gpt before the rename); None without one.
    Its architecture fields must be ones smdm computes (`_LITGPT_FIXED`, and head_size = n_embd / n_head). fields:
    n_head, n_kv_head (n_query_groups), max_seq_len (block_size), rope_base, norm_eps in smdm's names, checked
    by `_field` (None when absent or null)."""
    path = Path(path)
    for name in ("model_config.yaml", "lit_config.json"):
        f = path.parent / name
        if f.is_file():
            break
    else:
        return None
    try:
        if f.suffix == ".json":
            conf = json.loads(f.read_text())
        else:
            try:
                import yaml
            except ImportError:
                raise ConvertError(f"{f}: reading litgpt's model config needs PyYAML (pip install pyyaml)") from None
            conf = yaml.safe_load(f.read_text())
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 — a YAML or JSON syntax error, an unreadable file
        raise ConvertError(f"{f}: not a readable litgpt config ({e})") from None
    if not isinstance(conf, dict):
        raise ConvertError(f"{f}: not a litgpt config (a mapping of Config fields)")
    for key, want in _LITGPT_FIXED.items():
        got = conf.get(key, want)
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float)) and float(got) == want):
            raise ConvertError(f"{f}: {key} is {got!r}; smdm's Llama block computes only {key}={want!r}")
    got = _fields(conf, f, {"n_head": int, "n_query_groups": int, "block_size": int, "rope_base": float,
                            "norm_eps": float, "n_embd": int, "head_size": int})
    n_embd, n_head, head = got["n_embd"], got["n_head"], got["head_size"]
    if head is not None and n_embd and n_head and head * n_head != n_embd:
        raise ConvertError(f"{f}: head_size {head} x n_head {n_head} != n_embd {n_embd}; smdm's heads split the "
                           f"width")
    return f, {"n_head": n_head, "n_kv_head": got["n_query_groups"], "max_seq_len": got["block_size"],
               "rope_base": got["rope_base"], "norm_eps": got["norm_eps"]}


def trained_schedule(conf: dict) -> Optional[str]:
    """`checkpoint.trained_schedule` when it is a name (what an export can record), else None."""
    from smdm.checkpoint import trained_schedule as recorded

    name = recorded(conf)
    return name if isinstance(name, str) else None


def _schedule_conf(schedule: Optional[str], cfg: ModelConfig, what: str) -> dict:
    """{"train": {"schedule": NAME}} for an imported MDM's config.json (where `smdm generate` and `smdm eval` take
    their default schedule), {} when there is none; the name is checked and made canonical."""
    if schedule is None:
        return {}
    from smdm.diffusion import parse_schedule

    if cfg.causal:
        raise ConvertError(f"{what}schedule {schedule!r}: the weights are an autoregressive model (no noise schedule)")
    try:
        return {"train": {"schedule": parse_schedule(schedule).name}}
    except ValueError as e:
        raise ConvertError(f"{what}schedule: {e}") from None


def _out_path(out) -> Path:
    """--out made absolute and normal, symlinks followed: temporary names are derived from a real name in the
    real parent ("." and "new/.." have none, and "new/.." must not create new/), and an --out that is a symlink
    is written through: its target is what gets written (or replaced), the link stays."""
    return Path(out).resolve()


@contextlib.contextmanager
def _mkdirs_undone_on_error(d: Path):
    """Run the body (which creates `d` and its missing parents); when it fails, remove those of them that did not
    exist before and are empty: a failed convert leaves no empty --out behind."""
    made, p = [], d
    while not p.exists() and p != p.parent:
        made.append(p)  # deepest first
        p = p.parent
    try:
        yield
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (not ours to remove) or already gone
                break
        raise


def _own_storage(state: dict) -> dict:
    """`state` with every tensor that shares storage with an earlier one cloned: tied weights (a torch file whose
    lm_head.weight IS transformer.wte.weight) are legitimate input, but safetensors refuses to save shared
    tensors."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _save_checkpoint(out: Path, weights: dict, conf: dict, source: Path, tokenizer=None) -> Path:
    """OUT/step-0 of an import: weights-only (train_state records only where it came from)."""
    from smdm import checkpoint as ckpt

    with _mkdirs_undone_on_error(out):
        return ckpt.save(out, 0, model_state=_own_storage(weights), config=conf,
                         train_state={"step": 0, "converted_from": str(source.resolve())}, tokenizer_path=tokenizer)


def _save_safetensors_atomic(state: dict, path: Path, metadata: dict) -> None:
    from smdm.data import fsync_dir, save_safetensors, temp_path

    with _mkdirs_undone_on_error(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
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
    """`t` (tensor `key` of `source`) once it has this shape and a floating-point dtype (smdm's parameters are)."""
    if tuple(t.shape) != tuple(shape):
        raise ConvertError(f"{source}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_floating_point():
        raise ConvertError(f"{source}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; model weights must "
                           f"be floating point")
    return t


def _matrix(state: dict, key: str, source: str) -> tuple[int, int]:
    """The (rows, columns) of tensor `key`, which must be a matrix."""
    shape = tuple(state[key].shape)
    if len(shape) != 2:
        raise ConvertError(f"{source}: {key} has shape {shape}, expected a matrix (2 dims)")
    return shape


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
    vocab, d = _matrix(state, "lm_head.weight", source)
    rows, cols = _matrix(state, "transformer.wte.weight", source)
    if rows not in (vocab, vocab + 1) or cols != d:
        raise ConvertError(f"{source}: transformer.wte.weight has shape {(rows, cols)}; with lm_head.weight "
                           f"{(vocab, d)} it must have {vocab + 1} rows (MDM) or {vocab} (autoregressive)")
    causal = rows == vocab
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    mlp = "transformer.h.0.mlp."
    if mlp + "swiglu.w1.weight" in state:
        d_ff = _matrix(state, mlp + "swiglu.w1.weight", source)[0]
    elif mlp + "swiglu.w12.weight" in state:
        d_ff = _matrix(state, mlp + "swiglu.w12.weight", source)[0] // 2
    elif mlp + "fc_1.weight" in state:
        d_ff = _matrix(state, mlp + "fc_1.weight", source)[0]
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
    qkv_rows = _matrix(state, qkv, source)[0]
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
                  max_seq_len: Optional[int] = None, dtype: str = "keep", schedule: Optional[str] = None) -> Path:
    """Write an smdm checkpoint `OUT/step-0/` from a lit-gpt weights file; returns the step dir. A file written
    by `export_litgpt` carries its smdm config: unless `config` / `n_head` / `max_seq_len` say otherwise, the
    heads, context, RoPE base and norm eps come from it (where its shapes agree), so a round trip is exact.
    Next to a litgpt checkpoint's weights, its `model_config.yaml` (or lit-gpt's `lit_config.json`) gives them
    (n_head, n_query_groups, block_size, rope_base, norm_eps; an architecture smdm cannot compute is refused);
    else RoPE base 10000, eps 1e-5 (SMDM's, TinyLlama's) and max_seq_len 2048. `schedule`: the MDM's training
    noise schedule (default: the one the file records; none for other files, which `smdm generate` reads as
    linear, SMDM's)."""
    from smdm import checkpoint as ckpt

    path, out = Path(path), _out_path(out)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConvertError(f"--tokenizer {tokenizer}: no such file")
    for option, value in (("--n-head", n_head), ("--max-seq-len", max_seq_len)):
        if value is not None and value < 1:  # 0 would fall back to the default, -5 a traceback
            raise ConvertError(f"{option} must be >= 1, got {value}")
    if ckpt.step_dirs(out):
        raise ConvertError(f"{out} already holds checkpoints; choose an empty --out")
    state = read_state_dict(path)
    saved = read_exported_config(path)
    lit = read_litgpt_config(path) if saved is None else None  # litgpt's checkpoint dir: model_config.yaml
    if lit is not None:  # in smdm's names, for the same rules as an export's record
        saved = lit[1]
    if saved is not None and config is None and n_head is None:
        n_head = saved["n_head"]
    cfg = infer_config(state, source=str(path), config=config, n_head=n_head,
                       max_seq_len=max_seq_len or (saved or {}).get("max_seq_len") or 2048)  # None: absent
    heads_agree = saved is not None and saved["n_head"] in (None, cfg.n_head) and \
        saved["n_kv_head"] in (None, cfg.kv_heads)
    if lit is not None and not heads_agree:
        raise ConvertError(f"{lit[0]}: n_head {saved['n_head']}, n_query_groups {saved['n_kv_head']}, but the "
                           f"weights read as {cfg.n_head} heads in {cfg.kv_heads} groups (--n-head / --config?)")
    fields = ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "causal")
    if lit is not None or heads_agree and all(saved[f] == getattr(cfg, f) for f in fields):  # an export's record
        cfg = dataclasses.replace(cfg, rope_base=saved["rope_base"] or cfg.rope_base,  # of this very model
                                  norm_eps=saved["norm_eps"] or cfg.norm_eps)
    weights = from_litgpt(state, cfg, source=str(path))
    if DTYPES[dtype] is not None:
        weights = {k: v.to(DTYPES[dtype]) for k, v in weights.items()}
    if tokenizer is not None:
        _check_tokenizer(tokenizer, cfg)
    kind = "ar" if cfg.causal else "mdm"
    conf = {"model": cfg.to_dict(), "objective": kind, "config_name": config,
            "converted_from": {"path": str(path.resolve()), "format": "lit-gpt"}}
    recorded = None if cfg.causal else _safetensors_metadata(path).get("smdm_schedule")  # older exports of ARMs
    conf.update(_schedule_conf(schedule or recorded, cfg, "--" if schedule else f"{path}: smdm_"))
    return _save_checkpoint(out, weights, conf, path, tokenizer)


def _check_tokenizer(tokenizer, cfg: ModelConfig, what: str = "--tokenizer ") -> None:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ConvertError(f"{what}{tokenizer}: not a tokenizer.json ({e})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size and not _mask_token_appended(tok, n, cfg):
        raise ConvertError(f"{what}{tokenizer}: {n} tokens, but the model has only {cfg.vocab_size} "
                           f"outputs (a different tokenizer?)")


def _mask_token_appended(tok, n: int, cfg: ModelConfig) -> bool:
    """An MDM's tokenizer with one token more than the model's outputs, the mask token at the mask id: what
    transformers saves back (`save_pretrained`) after `AutoTokenizer` of a `to-hf` directory added it."""
    return not cfg.causal and n == cfg.vocab_size + 1 and tok.id_to_token(cfg.mask_id) == HF_MASK_TOKEN


def _checkpoint_model_config(step_dir: Path, conf) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json (dict `conf`): its "model" object, every field checked
    (`_model_fields`); a missing, mistyped or unknown field is an error naming the file."""
    where = Path(step_dir) / "config.json"
    model = conf.get("model") if isinstance(conf, dict) else None
    if not isinstance(model, dict):
        raise ConvertError(f"{where}: bad model config (no 'model' object)")
    _model_fields(model, f"{where} (model)")
    try:
        return ModelConfig(**model)
    except (TypeError, ValueError) as e:  # a missing or unknown field, an inconsistent one
        raise ConvertError(f"{where}: bad model config ({e})") from None


def export_litgpt(ckpt_path, out, *, dtype: str = "keep", layout: str = "smdm", overwrite: bool = False) -> Path:
    """Write an smdm checkpoint's weights as one lit-gpt-layout .safetensors file: for SMDM's own code by default,
    or for litgpt's GPT (`layout`, see `LAYOUTS`). An existing file is replaced only with `overwrite`, and never
    one inside the checkpoint; an `out` that is a symlink is followed (its target is written)."""
    from smdm import checkpoint as ckpt

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ConvertError(f"--layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if Path(out).suffix != ".safetensors":  # the name as given (a link's target may be a content-addressed blob)
        raise ConvertError(f"--out {out}: the lit-gpt export is a .safetensors file")
    shown, out = out, _out_path(out)
    if out.is_dir():
        raise ConvertError(f"--out {shown}: is a directory (the lit-gpt export is one .safetensors file)")
    if out.exists() and not overwrite:
        raise ConvertError(f"--out {shown}: exists (pass --overwrite to replace it)")
    step_dir = ckpt.resolve(ckpt_path)
    if step_dir.resolve() in out.parents:
        raise ConvertError(f"--out {shown}: inside the checkpoint being converted ({step_dir})")
    ckpt.verify(step_dir)
    conf = ckpt.read_config(step_dir)
    cfg = _checkpoint_model_config(step_dir, conf)
    state = to_litgpt(ckpt.load_weights(step_dir), cfg, layout)
    meta = {"format": "lit-gpt", "layout": layout, "source": str(step_dir), "smdm_model": json.dumps(cfg.to_dict())}
    schedule = trained_schedule(conf)
    if schedule is not None and not cfg.causal:  # restored by from-litgpt: generate's default schedule (the
        meta["smdm_schedule"] = schedule       # trainer records "linear" for ARM runs too: no meaning there)
    if DTYPES[dtype] is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    _save_safetensors_atomic(state, out, meta)
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers
#
# `to-hf` writes a directory that transformers loads:
# - the ARM twin as a plain `LlamaForCausalLM` (no remote code): smdm's block is transformers' Llama block
#   (pre-RMSNorm, GPT-NeoX half-split RoPE = transformers' `rotate_half`, SwiGLU, no biases, untied head);
# - the MDM as `SmdmForMaskedLM` (model_type "smdm"), with its code (python/smdm/hf/, torch and transformers only)
#   copied next to the weights and named in config.json's `auto_map`, loaded with trust_remote_code=True: Llama's
#   modules with a bidirectional mask. Its config.json counts the mask token in vocab_size (= smdm's
#   vocab_size + 1, the embedding's rows; mask_token_id = smdm's mask id, the last one), as transformers expects
#   of a special token's id; the head has smdm's vocab_size outputs. AutoModelForMaskedLM is its Auto class: an
#   MDM predicts the tokens at masked positions from both sides, the masked-LM interface (it has no
#   left-to-right `generate()`). AutoTokenizer needs trust_remote_code=True too, as for any model type that
#   transformers does not know: it reads config.json's model type (the tokenizer itself is plain `tokenizers`).
# Tensor names (model.layers.i. ...): smdm's fused attention rows [Q | K | V] are split into q_proj / k_proj /
# v_proj as they are: both layouts are head-major with the rotated halves inside each head, so no row
# permutation (transformers' Llama conversion permutes q/k only for Meta's interleaved RoPE). SwiGLU
# w3(silu(w1 x) * w2 x) is down(silu(gate x) * up x): w1 = gate_proj, w2 = up_proj, w3 = down_proj.
# The tokenizer: tokenizer.json copied as it is, plus a tokenizer_config.json naming the EOS (and BOS) token
# that smdm's data pipeline finds, and for the MDM the mask token (`HF_MASK_TOKEN`, see `_hf_tokenizer_config`).
# `from-hf` reads these directories back, and plain transformers Llama directories (config.json and
# model.safetensors or shards with model.safetensors.index.json); a round trip is exact.

HF_ARM = "LlamaForCausalLM"
HF_MDM = "SmdmForMaskedLM"
HF_MDM_TYPE = "smdm"  # config.json model_type of the MDM (transformers' Llama is "llama")
HF_MASK_TOKEN = "<|mdm_mask|>"  # the MDM's mask token (smdm's mask id, V) in the exported tokenizer
HF_CODE = ("configuration_smdm.py", "modeling_smdm.py")  # python/smdm/hf/, copied next to an MDM's weights
HF_AUTO_MAP = {"AutoConfig": "configuration_smdm.SmdmConfig", "AutoModel": "modeling_smdm.SmdmModel",
               "AutoModelForMaskedLM": "modeling_smdm.SmdmForMaskedLM"}
# smdm block tensor -> transformers Llama tensor (both inside a block); the fused QKV is split (see above)
_HF_BLOCK = {"norm1.weight": "input_layernorm.weight", "attn.proj.weight": "self_attn.o_proj.weight",
             "norm2.weight": "post_attention_layernorm.weight", "mlp.w1.weight": "mlp.gate_proj.weight",
             "mlp.w2.weight": "mlp.up_proj.weight", "mlp.w3.weight": "mlp.down_proj.weight"}
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def to_hf(state: dict, config: ModelConfig) -> dict:
    """transformers Llama tensors (`model.layers.i.self_attn.q_proj.weight`, ...) of an smdm state dict."""
    c = config
    hd = c.head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        parts = state[q + "attn.qkv.weight"].split([c.n_head * hd, c.kv_heads * hd, c.kv_heads * hd])
        out.update({p + name: t.clone() for name, t in zip(_HF_QKV, parts)})  # own storage: no shared views
        out.update({p + theirs: state[q + ours] for ours, theirs in _HF_BLOCK.items()})
    out["model.norm.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["head.weight"]
    return out


def from_hf(state: dict, config: ModelConfig, *, source: str = "state dict", files: Optional[dict] = None) -> dict:
    """The smdm state dict of transformers Llama tensors (the inverse of `to_hf`, exact). `files`: tensor name ->
    the file that holds it (named in errors, else `source`). Every tensor must be used, except the RoPE
    `inv_freq` buffers that files of older transformers versions hold."""
    state = dict(state)
    files = files or {}
    c = config
    d, hd = c.d_model, c.head_dim

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in state:
            raise ConvertError(f"{source}: missing tensor {key!r}")
        return _shape(state.pop(key), shape, key, files.get(key, source))

    out = {"embed.weight": take("model.embed_tokens.weight", (c.n_embed_rows, d))}
    shapes = {"norm1.weight": (d,), "attn.proj.weight": (d, c.n_head * hd), "norm2.weight": (d,),
              "mlp.w1.weight": (c.d_ff, d), "mlp.w2.weight": (c.d_ff, d), "mlp.w3.weight": (d, c.d_ff)}
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        qkv = [take(p + name, (rows * hd, d)) for name, rows in zip(_HF_QKV, (c.n_head, c.kv_heads, c.kv_heads))]
        out[q + "attn.qkv.weight"] = torch.cat(qkv)  # [Q | K | V]
        out.update({q + ours: take(p + theirs, shapes[ours]) for ours, theirs in _HF_BLOCK.items()})
    out["norm.weight"] = take("model.norm.weight", (d,))
    out["head.weight"] = take("lm_head.weight", (c.vocab_size, d))
    left = sorted(k for k in state if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise ConvertError(f"{files.get(left[0], source)}: {len(left)} tensor(s) this model has no place for, e.g. "
                           f"{left[:4]} (a different architecture, or more layers than num_hidden_layers "
                           f"{c.n_layer}?)")
    return out


def hf_model_config(conf: dict, path, *, mdm: bool = False, shapes: Optional[dict] = None) -> ModelConfig:
    """The smdm ModelConfig of a transformers config.json (dict `conf`, read from `path`): LlamaForCausalLM
    (model_type "llama"; the ARM twin, or with `mdm` an MDM whose embedding has one more row than the head's
    outputs, given by `shapes`: tensor name -> shape) or smdm's exported MDM (model_type "smdm", vocab_size
    counting the mask token). Defaults are
    LlamaConfig's (rms_norm_eps 1e-6, rope_theta 10000, context 2048); what smdm's block cannot compute is an
    error naming the field."""
    archs, model_type = conf.get("architectures") or [], conf.get("model_type")
    if not isinstance(archs, list):
        raise ConvertError(f"{path}: field 'architectures' must be a list of class names, got {archs!r}")
    if model_type == HF_MDM_TYPE or HF_MDM in archs:
        causal = False
    elif model_type == "llama" or HF_ARM in archs:
        causal = not mdm
    else:
        raise ConvertError(f"{path}: field 'architectures' is {archs} (model_type {model_type!r}): from-hf reads "
                           f"{HF_ARM} (model_type 'llama') and smdm's MDM export ({HF_MDM}, model_type "
                           f"'{HF_MDM_TYPE}')")
    if (conf.get("hidden_act") or "silu") != "silu":
        raise ConvertError(f"{path}: field 'hidden_act' is {conf['hidden_act']!r}; smdm's SwiGLU uses silu")
    for name in ("attention_bias", "mlp_bias"):
        if conf.get(name):
            raise ConvertError(f"{path}: field {name!r} is true; smdm's block has no biases")
    for field in ("rope_parameters", "rope_scaling"):  # transformers 5 / 4 names of the RoPE variant
        rope = conf.get(field)
        if rope is not None and not isinstance(rope, dict):
            raise ConvertError(f"{path}: field {field!r} must be an object, got {rope!r}")
        if (rope or {}).get("rope_type", (rope or {}).get("type", "default")) != "default":
            raise ConvertError(f"{path}: field {field!r} is {rope!r}; smdm's RoPE is the default (unscaled) one")
    rope_base = _field(conf.get("rope_parameters") or {}, "rope_theta", f"{path} (rope_parameters)", float,
                       default=_field(conf, "rope_theta", path, float, default=10000.0))
    d = _field(conf, "hidden_size", path)
    n_head = _field(conf, "num_attention_heads", path)
    n_kv = _field(conf, "num_key_value_heads", path, default=n_head)
    head_dim = _field(conf, "head_dim", path, default=None)
    if head_dim is not None and head_dim * n_head != d:
        raise ConvertError(f"{path}: field 'head_dim' is {head_dim}; smdm's heads are hidden_size / "
                           f"num_attention_heads = {d} / {n_head} wide")
    if conf.get("tie_word_embeddings") and not causal:
        raise ConvertError(f"{path}: field 'tie_word_embeddings' is true, but an MDM's head cannot share its "
                           f"embedding (which has one more row, the mask token)")
    vocab = _field(conf, "vocab_size", path)
    if model_type == HF_MDM_TYPE:  # the mask token is the last id
        mask_id = conf.get("mask_token_id")
        if mask_id is not None and mask_id != vocab - 1:
            raise ConvertError(f"{path}: field 'mask_token_id' is {mask_id!r}; smdm's MDM reads the mask as the last "
                               f"id, vocab_size - 1 = {vocab - 1}")
        vocab -= 1
        if vocab < 1:
            raise ConvertError(f"{path}: field 'vocab_size' must count at least one token and the mask")
    elif shapes is not None:  # a Llama directory: the embedding's rows against the head's say which kind
        rows = (shapes.get("model.embed_tokens.weight") or (None,))[0]  # a wrong rank is from_hf's error
        outputs = (shapes.get("lm_head.weight") or (None,))[0]
        extra = rows is not None and outputs is not None and rows == outputs + 1
        if causal and extra:
            raise ConvertError(f"{path}: model.embed_tokens.weight has {rows} rows, lm_head.weight {outputs}: the "
                               f"extra row of an MDM's mask token? (convert it with --mdm)")
        if not causal:  # --mdm
            if not extra:
                raise ConvertError(f"{path}: --mdm needs an embedding with one more row than the head's outputs "
                                   f"(the mask token, id vocab_size), but model.embed_tokens.weight has {rows} rows "
                                   f"and lm_head.weight {outputs}: an autoregressive Llama (convert it without "
                                   f"--mdm)")
            if vocab not in (outputs, rows):
                raise ConvertError(f"{path}: field 'vocab_size' is {vocab}, but lm_head.weight has {outputs} rows")
            vocab = outputs
    n_layer, d_ff = _field(conf, "num_hidden_layers", path), _field(conf, "intermediate_size", path)
    max_seq_len = _field(conf, "max_position_embeddings", path, default=2048)
    norm_eps = _field(conf, "rms_norm_eps", path, float, default=1e-6)
    try:  # what ModelConfig checks across fields (heads dividing the width, even head dims)
        return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, d_ff=d_ff, vocab_size=vocab,
                           n_kv_head=None if n_kv == n_head else n_kv, max_seq_len=max_seq_len, causal=causal,
                           rope_base=rope_base, norm_eps=norm_eps)
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None


def read_hf_weights(model_dir) -> tuple:
    """(name -> tensor, name -> file) of a transformers directory: the shards of model.safetensors.index.json,
    else model.safetensors, else every *.safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConvertError(f"{index}: not a safetensors index (needs a 'weight_map' object of tensor name -> "
                               f"file)") from None
        names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not names:
            raise ConvertError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                               f"(for torch .bin weights: load them in transformers and save_pretrained first)")
    state, files = {}, {}
    for name in names:
        path = model_dir / name
        if not path.is_file():
            raise ConvertError(f"{index}: its weight_map names {name}, which does not exist")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
        for key, t in tensors.items():
            if key in state:
                raise ConvertError(f"{path}: tensor {key!r} is also in {files[key]}")
            state[key], files[key] = t, str(path)
    for key, name in (weight_map or {}).items():
        if files.get(key) != str(model_dir / name):
            raise ConvertError(f"{index}: its weight_map puts {key!r} in {name}, but "
                               f"{'it is in ' + files[key] if key in files else 'no shard holds it'}")
    return state, files


def _hf_tokenizer_config(path: Path, cfg: ModelConfig, log) -> tuple:
    """(tokenizer_config.json dict, eos id, bos id) for the checkpoint's tokenizer.json, which is copied as it
    is. EOS and BOS are the tokens smdm's data pipeline finds (`smdm._core.Tokenizer`; the samplers' EOS names
    when that finds none). The MDM's mask token: the mask id is vocab_size, one past the tokenizer's last token
    when the tokenizer has exactly vocab_size tokens (the usual case: smdm's data sets vocab_size from it), so
    tokenizer_config.json names `HF_MASK_TOKEN` as `mask_token` and transformers adds it as a special token with
    that very id (tokenizer.mask_token_id == config.mask_token_id; "<|mdm_mask|>" in a text encodes to it). With
    fewer tokens an added token would get a smaller id, so none is named (a note says so): the model still reads
    config.json's mask_token_id."""
    from tokenizers import Tokenizer

    from smdm.sft import find_eos

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ConvertError(f"{path}: not a tokenizer.json ({e})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size and not _mask_token_appended(tok, n, cfg):
        raise ConvertError(f"{path}: {n} tokens, but the model has only {cfg.vocab_size} outputs")
    try:
        from smdm._core import Tokenizer as DataTokenizer

        found = DataTokenizer.from_file(str(path))
        eos, bos = found.eos_id, found.bos_id
    except Exception:  # no EOS by the data pipeline's names (or no extension): the samplers' names
        eos, bos = find_eos(tok), None
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False}  # decode exactly as `tokenizers` does
    for name, i in (("bos_token", bos), ("eos_token", eos)):
        if i is not None:
            conf[name] = tok.id_to_token(i)
    if eos is None:
        log(f"note: {path} has no EOS token by the usual names: tokenizer_config.json names none")
    if not cfg.causal:
        taken = tok.token_to_id(HF_MASK_TOKEN)
        if n == cfg.vocab_size and taken is None or _mask_token_appended(tok, n, cfg):
            conf["mask_token"] = HF_MASK_TOKEN
        else:
            why = (f"{HF_MASK_TOKEN} is already token {taken}" if taken is not None else
                   f"it has {n} tokens, the mask id is {cfg.vocab_size}")
            log(f"note: {path}: {why}, so the exported tokenizer names no mask token (put id {cfg.vocab_size}, "
                f"config.json's mask_token_id, into input_ids)")
    return conf, eos, bos


def hf_config(cfg: ModelConfig, dtype: torch.dtype, *, eos_id: Optional[int] = None,
              bos_id: Optional[int] = None) -> dict:
    """The config.json of `to-hf`: LlamaConfig's fields (what transformers 5 writes, plus `rope_theta` and
    `torch_dtype`, the names transformers 4 reads, which 5 accepts); the MDM's has model_type "smdm",
    `auto_map`, `mask_token_id` and the mask counted in vocab_size. bos/eos are written even when unknown (null):
    absent, LlamaConfig would default them to Llama-2's 1 and 2."""
    dtype_name = str(dtype).removeprefix("torch.")
    conf = {"architectures": [HF_ARM if cfg.causal else HF_MDM], "model_type": "llama" if cfg.causal else HF_MDM_TYPE,
            "vocab_size": cfg.n_embed_rows, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base}, "rope_theta": cfg.rope_base,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": cfg.causal,
            "dtype": dtype_name, "torch_dtype": dtype_name}
    if not cfg.causal:
        conf.update(mask_token_id=cfg.mask_id, auto_map=dict(HF_AUTO_MAP))
    return conf


def _check_out_dir(out: Path, shown, overwrite: bool, protect: Path) -> None:
    """`out` (`_out_path` of the --out `shown`) can be written by `_write_dir_atomic`: not a file, empty unless
    `overwrite`, not holding the checkpoint `protect`, nor the current directory: the finished directory is
    renamed into place, and a directory replaced under the shell would leave it in a deleted one."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ConvertError(f"--out {shown}: is the current directory or holds it, which cannot be replaced "
                           f"atomically (the export is renamed into place); name a new directory, e.g. --out "
                           f"{os.path.join(shown, 'hf')}")
    if out == protect.resolve() or out in protect.resolve().parents:
        raise ConvertError(f"--out {shown}: holds the checkpoint being converted")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {shown}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"--out {shown}: exists and is not empty (pass --overwrite to replace it)")


def _write_dir_atomic(out: Path, fill) -> None:
    """`fill(tmp)` writes the files into a temporary dir next to `out` (an `_out_path`: no symlink); every file
    and the dir are fsynced, the dir is renamed to `out` (atomic on POSIX; an empty `out` is replaced by the
    rename) and the parent fsynced. A non-empty `out` (--overwrite) is first renamed away, then deleted."""
    import shutil

    from smdm.data import fsync_dir, temp_path

    with _mkdirs_undone_on_error(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = temp_path(out), temp_path(out, "old")
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        tmp.mkdir()
        moved = False
        try:
            fill(tmp)
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if out.is_dir() and any(out.iterdir()):
                os.replace(out, old)
                moved = True
            os.replace(tmp, out)
            moved = False  # the new dir is in place: the old one can go
        except BaseException:
            if moved:  # the new one did not take its place: put the old one back
                os.replace(old, out)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def export_hf(ckpt_path, out, *, dtype: str = "keep", overwrite: bool = False, log=None) -> Path:
    """Write an smdm checkpoint as a transformers directory `out` (see "Hugging Face transformers" above):
    config.json, model.safetensors, tokenizer.json + tokenizer_config.json when the checkpoint has a tokenizer,
    and the MDM's model code. Written whole into a temporary dir and renamed; an existing non-empty `out` is
    replaced only with `overwrite`; an `out` that is a symlink is followed (its target is written, the link
    stays); the current directory, or one holding it, is refused. `log(msg)` gets notes (default: stderr)."""
    import shutil

    from smdm import checkpoint as ckpt
    from smdm.data import save_safetensors

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    step_dir = ckpt.resolve(ckpt_path)
    shown, out = out, _out_path(out)
    _check_out_dir(out, shown, overwrite, step_dir)
    ckpt.verify(step_dir)
    ck_conf = ckpt.read_config(step_dir)
    cfg = _checkpoint_model_config(step_dir, ck_conf)
    state = to_hf(ckpt.load_weights(step_dir), cfg)
    if DTYPES[dtype] is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    tok = step_dir / "tokenizer.json"
    tok_conf, eos, bos = _hf_tokenizer_config(tok, cfg, log) if tok.is_file() else (None, None, None)
    if tok_conf is None:
        log(f"note: {step_dir} has no tokenizer.json: {out} has no tokenizer")
    conf = hf_config(cfg, state["lm_head.weight"].dtype, eos_id=eos, bos_id=bos)
    schedule = trained_schedule(ck_conf)
    if not cfg.causal and schedule is not None:  # restored by from-hf
        conf["smdm_schedule"] = schedule
    code = Path(__file__).resolve().parent / "hf"

    def fill(tmp: Path) -> None:
        save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})  # transformers 4 refuses metadata without "format"
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        if tok_conf is not None:
            shutil.copyfile(tok, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_conf, indent=2) + "\n")
        if not cfg.causal:
            for name in HF_CODE:
                shutil.copyfile(code / name, tmp / name)

    _write_dir_atomic(out, fill)
    return out


def import_hf(model_dir, out, *, mdm: bool = False, dtype: str = "keep", schedule: Optional[str] = None) -> Path:
    """Write an smdm checkpoint `OUT/step-0/` from a transformers directory (an `export_hf` output, or a plain
    LlamaForCausalLM: the ARM twin, or with `mdm` an MDM when its embedding has the extra mask row); its
    tokenizer.json is copied along. Returns the step dir. `schedule`: the MDM's training noise schedule (default:
    config.json's `smdm_schedule`, which `export_hf` writes; else none, read as linear)."""
    from smdm import checkpoint as ckpt

    model_dir, out = Path(model_dir), _out_path(out)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if ckpt.step_dirs(out):
        raise ConvertError(f"{out} already holds checkpoints; choose an empty --out")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise ConvertError(f"{path}: not a JSON object")
    state, files = read_hf_weights(model_dir)
    cfg = hf_model_config(conf, path, mdm=mdm, shapes={k: tuple(v.shape) for k, v in state.items()})
    if cfg.causal and conf.get("tie_word_embeddings") and "lm_head.weight" not in state:
        if "model.embed_tokens.weight" in state:  # tied: the head is the embedding
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    weights = from_hf(state, cfg, source=str(model_dir), files=files)
    if DTYPES[dtype] is not None:
        weights = {k: v.to(DTYPES[dtype]) for k, v in weights.items()}
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        _check_tokenizer(tokenizer, cfg, what="")
    conf_out = {"model": cfg.to_dict(), "objective": "ar" if cfg.causal else "mdm",
                "converted_from": {"path": str(model_dir.resolve()), "format": "hugging-face"}}
    recorded = conf.get("smdm_schedule")
    if recorded is not None and not isinstance(recorded, str):
        raise ConvertError(f"{path}: field 'smdm_schedule' must be a schedule name (a string), got {recorded!r}")
    conf_out.update(_schedule_conf(schedule or recorded, cfg, "--" if schedule else f"{path}: smdm_"))
    return _save_checkpoint(out, weights, conf_out, model_dir, tokenizer if tokenizer.is_file() else None)


SCHEDULE_HELP = ("the MDM's training noise schedule, linear | cosine | polynomial:P, saved as the default of `smdm "
                 "generate` (default: the one an `smdm convert to-*` export records; else none, read as linear)")


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
    p.add_argument("--schedule", default=None, help=SCHEDULE_HELP)
    p = sub.add_parser("to-litgpt", help="an smdm checkpoint -> one lit-gpt-layout .safetensors file")
    p.add_argument("ckpt", help="run dir or step dir")
    p.add_argument("--out", required=True, help="FILE.safetensors (must not exist, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    p.add_argument("--layout", choices=list(LAYOUTS), default="smdm",
                   help="smdm: SMDM's / TinyLlama's code (fused QKV grouped per key/value head, xformers SwiGLU "
                        "w1/w2/w3); litgpt-grouped: litgpt <= 0.5.4 (grouped attn.attn, fc_1/fc_2/proj); litgpt: "
                        "litgpt >= 0.5.5 (attn.qkv, fc_1/fc_2/proj)")
    p = sub.add_parser("to-hf", help="an smdm checkpoint -> a Hugging Face transformers directory (the ARM twin "
                       "as LlamaForCausalLM, the MDM with its model code for trust_remote_code)")
    p.add_argument("ckpt", help="run dir or step dir")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty, or --overwrite; "
                   "a symlink is followed; not the current directory, which cannot be replaced atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p = sub.add_parser("from-hf", help="a Hugging Face transformers directory (to-hf's output, or a plain Llama) "
                       "-> an smdm checkpoint")
    p.add_argument("model_dir", help="directory with config.json and model.safetensors (or sharded, with "
                   "model.safetensors.index.json)")
    p.add_argument("--out", required=True, help="run dir for the checkpoint (OUT/step-0)")
    p.add_argument("--mdm", action="store_true", help="a plain Llama dir holds an MDM: its embedding has one more "
                   "row than the head's outputs, the mask token (id vocab_size)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    p.add_argument("--schedule", default=None, help=SCHEDULE_HELP)
    parser.set_defaults(func=run)


def run(args) -> int:
    from smdm import checkpoint as ckpt

    try:
        if args.direction in ("from-litgpt", "from-hf"):
            if args.direction == "from-litgpt":
                step = import_litgpt(args.weights, args.out, tokenizer=args.tokenizer, config=args.config,
                                     n_head=args.n_head, max_seq_len=args.max_seq_len, dtype=args.dtype,
                                     schedule=args.schedule)
            else:
                step = import_hf(args.model_dir, args.out, mdm=args.mdm, dtype=args.dtype, schedule=args.schedule)
            conf = ckpt.read_config(step)
            cfg = ModelConfig(**conf["model"])
            kind = "autoregressive" if cfg.causal else "MDM"
            sched = trained_schedule(conf)
            print(f"{step}: {kind}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), width "
                  f"{cfg.d_model}, ffn {cfg.d_ff}, vocab {cfg.vocab_size}, "
                  f"{cfg.non_embedding_params() / 1e6:.1f}M non-embedding parameters"
                  + (f", noise schedule {sched}" if sched else ""))
        elif args.direction == "to-hf":
            out = export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
            arm = json.loads((out / "config.json").read_text())["model_type"] == "llama"
            how = ("AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR)" if arm else
                   "AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True) and "
                   "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)")  # the tokenizer reads config.json
            print(f"{out}: {HF_ARM if arm else HF_MDM} (load with transformers' {how})")
        else:
            print(export_litgpt(args.ckpt, args.out, dtype=args.dtype, layout=args.layout, overwrite=args.overwrite))
    except (ConvertError, ckpt.CheckpointError) as e:
        print(f"smdm convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output side (an unwritable --out, a full disk): the path and the reason
        what = f"{e.filename or args.out}: {e.strerror}" if e.strerror else str(e)  # SmdmIOError names its path
        print(f"smdm convert: error: {what}", file=sys.stderr)
        return 2
    return 0
