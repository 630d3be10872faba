# python -m pytest tests/test_convert.py -q
"""`smdm convert`: lit-gpt / SMDM / TinyLlama / litgpt weights in and out.

Two oracles: the real litgpt model code from PyPI (0.2.0: fused QKV grouped per key/value head, the layout of
SMDM's releases; 0.5.13: `attn.qkv` as [Q | K | V]), imported from `.litgpt/VERSION` (see `litgpt` below for
why and how it is installed); and an independent forward pass written here from the lit-gpt layout, with
explicit softmax attention instead of SDPA, for the xformers SwiGLU names of SMDM's own code that litgpt never
had. A converted checkpoint loaded by `smdm.load` must give the same logits."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import smdm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from smdm import checkpoint as ckpt
from smdm.cli import main as cli
from smdm.convert import ConvertError, from_litgpt, infer_config, read_state_dict
from smdm.model import build_model, config_by_name


def litgpt_state(n_layer, n_head, n_kv, d, d_ff, vocab, *, mdm: bool, mlp: str = "w1w2w3", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = d // n_head

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": w(vocab + (1 if mdm else 0), d, std=0.5), "lm_head.weight": w(vocab, d),
          "transformer.ln_f.weight": 1 + w(d, std=0.1)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = 1 + w(d, std=0.1)
        sd[p + "norm_2.weight"] = 1 + w(d, std=0.1)
        sd[p + "attn.attn.weight"] = w((n_head + 2 * n_kv) * hs, d, std=0.2)
        sd[p + "attn.proj.weight"] = w(d, d)
        w1, w2, w3 = w(d_ff, d), w(d_ff, d), w(d, d_ff)
        if mlp == "w12":
            sd[p + "mlp.swiglu.w12.weight"] = torch.cat([w1, w2])
            sd[p + "mlp.swiglu.w3.weight"] = w3
        elif mlp == "fc":
            sd.update({p + "mlp.fc_1.weight": w1, p + "mlp.fc_2.weight": w2, p + "mlp.proj.weight": w3})
        else:
            sd.update({p + "mlp.swiglu.w1.weight": w1, p + "mlp.swiglu.w2.weight": w2,
                       p + "mlp.swiglu.w3.weight": w3})
    return sd


def litgpt_forward(sd, idx, *, n_head, n_kv, causal):
    """lit-gpt's Llama forward from its layout: float64, explicit attention."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    d = sd["lm_head.weight"].shape[1]
    hs, q_per_kv = d // n_head, n_head // n_kv
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    theta = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), theta)  # (T, hs/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, hs/2)

    def rope(x):  # (B, T, H, hs), non-interleaved halves
        x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def norm(x, wt):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * wt

    x = sd["transformer.wte.weight"][idx]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = norm(x, sd[p + "norm_1.weight"])
        qkv = (h @ sd[p + "attn.attn.weight"].T).view(B, T, n_kv, q_per_kv + 2, hs)
        q = rope(qkv[:, :, :, :q_per_kv].reshape(B, T, n_head, hs))
        k = rope(qkv[:, :, :, q_per_kv])  # (B, T, n_kv, hs)
        v = qkv[:, :, :, q_per_kv + 1]
        k, v = k.repeat_interleave(q_per_kv, dim=2), v.repeat_interleave(q_per_kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, d)
        x = x + y @ sd[p + "attn.proj.weight"].T
        h = norm(x, sd[p + "norm_2.weight"])
        if p + "mlp.swiglu.w12.weight" in sd:
            w1, w2 = sd[p + "mlp.swiglu.w12.weight"].chunk(2)
            w3 = sd[p + "mlp.swiglu.w3.weight"]
        elif p + "mlp.fc_1.weight" in sd:
            w1, w2, w3 = sd[p + "mlp.fc_1.weight"], sd[p + "mlp.fc_2.weight"], sd[p + "mlp.proj.weight"]
        else:
            w1, w2, w3 = (sd[p + f"mlp.swiglu.{n}.weight"] for n in ("w1", "w2", "w3"))
        x = x + (torch.nn.functional.silu(h @ w1.T) * (h @ w2.T)) @ w3.T
    return norm(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("mdm,n_head,n_kv,mlp,fmt", [
    (True, 4, 4, "w1w2w3", "safetensors"),  # SMDM's MDM release layout
    (False, 4, 2, "w12", "pth"),  # the ARM twin, grouped-query heads, packed SwiGLU, a Lightning .pth
    (True, 6, 1, "fc", "pt"),  # multi-query, lit-gpt's LLaMAMLP names
])
def test_from_litgpt_computes_the_same_function(tmp_path, mdm, n_head, n_kv, mlp, fmt):
    d, d_ff, vocab, n_layer = 48, 80, 37, 3
    sd = litgpt_state(n_layer, n_head, n_kv, d, d_ff, vocab, mdm=mdm, mlp=mlp)
    src = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(src))
    else:  # a wrapper prefix (torch.compile) and Lightning's {"model": ...} dict are unwrapped
        torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}, "iter_num": 7}, src)
    rc = cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "run"), "--n-head", str(n_head)])
    assert rc == 0
    model, tok = smdm.load(tmp_path / "run", device="cpu")
    assert tok is None
    c = model.config
    assert (c.causal, c.n_layer, c.n_head, c.kv_heads, c.d_model, c.d_ff, c.vocab_size) == \
        (not mdm, n_layer, n_head, n_kv, d, d_ff, vocab)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab + (1 if mdm else 0), (2, 19), generator=g)  # the MDM's mask id included
    with torch.no_grad():
        ours = model(idx).double()
    ref = litgpt_forward(sd, idx, n_head=n_head, n_kv=n_kv, causal=not mdm)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    # and a wrong grouping would not pass: reading the rows as [all q | all k | all v] changes the logits
    if n_kv not in (1, n_head):
        wrong = {k: v for k, v in sd.items()}
        for i in range(n_layer):  # swap group order of the first block's fused rows
            key = f"transformer.h.{i}.attn.attn.weight"
            wrong[key] = sd[key].view(n_kv, -1, d).flip(0).reshape(-1, d)
        assert (litgpt_forward(wrong, idx, n_head=n_head, n_kv=n_kv, causal=not mdm) - ref).abs().max() > 1e-3


def test_round_trip_is_exact_and_named_sizes_are_recognised(tmp_path):
    for causal in (False, True):
        cfg = config_by_name("tiny", vocab_size=23, causal=causal, n_kv_head=1)
        model = build_model(cfg, seed=3)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(tmp_path / f"run{causal}", 5, model_state=state, config={"model": cfg.to_dict(),
                                                                             "objective": "mdm"},
                  train_state={"step": 5})
        out = tmp_path / f"lit{causal}.safetensors"
        assert cli(["convert", "to-litgpt", str(tmp_path / f"run{causal}"), "--out", str(out)]) == 0
        lit = load_file(str(out))
        assert lit["transformer.wte.weight"].shape[0] == 23 + (0 if causal else 1)
        assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file
        back = tmp_path / f"back{causal}"
        assert cli(["convert", "from-litgpt", str(out), "--out", str(back)]) == 0
        again = ckpt.load_weights(ckpt.resolve(back))
        assert set(again) == set(state)
        for k in state:
            assert torch.equal(again[k], state[k]), k
        assert ckpt.read_config(ckpt.resolve(back))["model"] == cfg.to_dict()  # from the file's metadata
        # without smdm's metadata (SMDM's own files): "tiny" is (2 layers, 64 wide, ffn 192), so the head count
        # comes from the named size, no --n-head; the context is the paper's 2048
        bare = tmp_path / f"bare{causal}.safetensors"
        save_file(lit, str(bare))
        assert cli(["convert", "from-litgpt", str(bare), "--out", str(tmp_path / f"bare{causal}")]) == 0
        assert ckpt.read_config(ckpt.resolve(tmp_path / f"bare{causal}"))["model"] == {**cfg.to_dict(),
                                                                                       "max_seq_len": 2048}


def test_dtype_option_and_generation_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x): return x + 1\n"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    V = tok.get_vocab_size()
    sd = litgpt_state(2, 2, 2, 64, 192, V, mdm=True)
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert cli(["convert", "from-litgpt", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "run"),
                "--tokenizer", str(tok_path), "--dtype", "bfloat16"]) == 0
    model, loaded_tok = smdm.load(tmp_path / "run", device="cpu")
    assert loaded_tok is not None and model.head.weight.dtype == torch.bfloat16
    out = smdm.generate(model, [loaded_tok.encode("def ").ids], gen_length=8, steps=4, seed=0)
    assert len(out.tokens[0]) <= 8 and all(0 <= t < V for t in out.tokens[0])
    # a tokenizer with more tokens than the model has outputs is refused
    small = litgpt_state(2, 2, 2, 64, 192, V - 5, mdm=True)
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(ConvertError, match="tokens, but the model has only"):
        from smdm.convert import import_litgpt

        import_litgpt(tmp_path / "small.safetensors", tmp_path / "run2", tokenizer=tok_path)


def test_bad_inputs_name_the_file_and_tensor(tmp_path, capsys):
    sd = litgpt_state(2, 2, 2, 64, 192, 30, mdm=True)
    path = tmp_path / "w.safetensors"

    def convert(state, **kw):
        save_file(state, str(path))
        st = read_state_dict(path)
        cfg = infer_config(st, source=str(path), **kw)
        return from_litgpt(st, cfg, source=str(path))

    with pytest.raises(ConvertError, match=r"w\.safetensors: missing tensor 'transformer\.h\.1\.norm_2\.weight'"):
        convert({k: v for k, v in sd.items() if k != "transformer.h.1.norm_2.weight"})
    with pytest.raises(ConvertError, match=r"no place for.*transformer\.h\.0\.attn\.time_emb"):
        convert({**sd, "transformer.h.0.attn.time_emb": torch.zeros(3)})
    with pytest.raises(ConvertError, match="must have 31 rows .MDM. or 30"):
        convert({**sd, "transformer.wte.weight": torch.zeros(40, 64)})
    with pytest.raises(ConvertError, match=r"not one of smdm's named sizes; pass --n-head"):
        convert(litgpt_state(3, 2, 2, 64, 192, 30, mdm=True))
    with pytest.raises(ConvertError, match="config 170M has"):
        convert(sd, config="170M")
    with pytest.raises(ConvertError, match="wrong --n-head"):  # 128 fused rows are not (1 + 2 n_kv) x 64
        convert(litgpt_state(2, 4, 2, 64, 192, 30, mdm=True), n_head=1)
    with pytest.raises(ConvertError, match="not divisible by n_head 3"):
        convert(sd, n_head=3)
    bad = tmp_path / "notes.pth"
    bad.write_text("not a pickle")
    assert cli(["convert", "from-litgpt", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "notes.pth: not a torch state dict" in err and len(err.splitlines()) == 1, err  # not torch's paragraphs
    save_file(sd, str(path))
    assert cli(["convert", "from-litgpt", str(path), "--out", str(tmp_path / "ok")]) == 0
    assert cli(["convert", "from-litgpt", str(path), "--out", str(tmp_path / "ok")]) == 2  # never overwrites
    assert "already holds checkpoints" in capsys.readouterr().err


def test_to_litgpt_out_that_is_a_directory_is_an_error(tmp_path, capsys):
    """--out d.safetensors that is a directory: a clear error before the weights are read, no traceback and no
    temporary file left."""
    cfg = config_by_name("tiny", vocab_size=23)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg, seed=0).state_dict(),
              config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    (tmp_path / "d.safetensors").mkdir()
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "d.safetensors: is a directory" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))


def test_round_trip_keeps_the_config_of_any_size(tmp_path):
    """to-litgpt records the smdm config in the file's metadata, so from-litgpt restores what the shapes do not
    hold: the context (not 2048), the heads of a spelled-out size that no name matches (no --n-head needed),
    grouped-query heads, RoPE base and norm eps. Explicit options still win."""
    from smdm.model import ModelConfig

    for causal in (False, True):
        cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=32, d_ff=80, vocab_size=19, max_seq_len=96,
                          causal=causal, rope_base=500.0, norm_eps=1e-6)
        state = {k: v.clone() for k, v in build_model(cfg, seed=1).state_dict().items()}
        run = tmp_path / f"run{causal}"
        ckpt.save(run, 3, model_state=state, config={"model": cfg.to_dict(), "objective": "mdm"},
                  train_state={"step": 3})
        lit = tmp_path / f"lit{causal}.safetensors"
        assert cli(["convert", "to-litgpt", str(run), "--out", str(lit)]) == 0
        back = tmp_path / f"back{causal}"
        assert cli(["convert", "from-litgpt", str(lit), "--out", str(back)]) == 0
        assert ckpt.read_config(ckpt.resolve(back))["model"] == cfg.to_dict()
        again = ckpt.load_weights(ckpt.resolve(back))
        assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
        other = tmp_path / f"other{causal}"
        assert cli(["convert", "from-litgpt", str(lit), "--out", str(other), "--max-seq-len", "64"]) == 0
        assert ckpt.read_config(ckpt.resolve(other))["model"]["max_seq_len"] == 64
        for bad in ("0", "-5"):  # not silently the recorded context (0), not a ModelConfig traceback (-5)
            with pytest.raises(ConvertError, match=f"--max-seq-len must be >= 1, got {bad}"):
                from smdm.convert import import_litgpt

                import_litgpt(lit, tmp_path / f"bad{causal}{bad}", max_seq_len=int(bad))


def test_mlp_shape_errors_name_the_tensor_of_the_file(tmp_path):
    """A wrong MLP shape names the file's own tensor (fc_2, w12, w3), in every layout."""
    for mlp, key, shape in [("fc", "transformer.h.1.mlp.fc_2.weight", (100, 64)),
                            ("w12", "transformer.h.1.mlp.swiglu.w12.weight", (300, 64)),
                            ("w1w2w3", "transformer.h.1.mlp.swiglu.w3.weight", (64, 100))]:
        sd = litgpt_state(2, 2, 2, 64, 192, 30, mdm=True, mlp=mlp)
        sd[key] = torch.zeros(shape)
        with pytest.raises(ConvertError, match=rf"w\.pt: {key.replace('.', '[.]')} has shape {shape}".replace(
                "(", r"\(").replace(")", r"\)")):
            from_litgpt(sd, infer_config(sd, source="w.pt"), source="w.pt")


def test_legacy_torch_files_and_nested_wrapper_prefixes(tmp_path):
    """A state dict in torch's legacy (non-zip) format loads (it cannot be memory-mapped); a DDP-wrapped
    compiled model's "module._orig_mod." prefix is stripped."""
    sd = litgpt_state(2, 2, 2, 64, 192, 30, mdm=False)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": sd}, legacy, _use_new_zipfile_serialization=False)
    got = read_state_dict(legacy)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    nested = tmp_path / "nested.pt"
    torch.save({"module._orig_mod." + k: v for k, v in sd.items()}, nested)
    assert set(read_state_dict(nested)) == set(sd)


def test_tied_weights_convert(tmp_path):
    """A torch file whose lm_head.weight IS transformer.wte.weight (tied weights: one storage) is legitimate
    input: safetensors refused to save the shared tensors (a traceback, and an empty --out left behind)."""
    sd = litgpt_state(2, 2, 2, 64, 192, 30, mdm=False)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    torch.save(sd, tmp_path / "tied.pth")
    assert cli(["convert", "from-litgpt", str(tmp_path / "tied.pth"), "--out", str(tmp_path / "run")]) == 0
    model, _ = smdm.load(tmp_path / "run", device="cpu")
    assert torch.equal(model.head.weight, sd["transformer.wte.weight"])
    assert torch.equal(model.embed.weight, sd["transformer.wte.weight"])


def _record(tmp_path, *, meta=None, yaml_line=None, edit=None) -> Path:
    """A tiny ARM lit-gpt file with an smdm_model metadata record `meta` (a dict, or a raw string), or none and a
    litgpt model_config.yaml beside it whose last line is `yaml_line`; tensors replaced from `edit`."""
    sd = {**litgpt_state(2, 4, 2, 64, 96, 30, mdm=False), **(edit or {})}
    src = tmp_path / "ckpt" / "w.safetensors"
    src.parent.mkdir()
    record = {} if meta is None else {"smdm_model": meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(sd, str(src), metadata=record)
    if yaml_line is not None:
        (src.parent / "model_config.yaml").write_text(f"n_layer: 2\nn_head: 4\nn_query_groups: 2\n{yaml_line}\n")
    return src


BAD_RECORDS = [
    # a record of an export (the smdm config in the file's metadata): every field checked
    ({"meta": {"n_head": "four"}}, r"w\.safetensors \(metadata smdm_model\): field 'n_head' must be a positive int, "
                                   r"got 'four'"),
    ({"meta": {"n_head": 0}}, r"\(metadata smdm_model\): field 'n_head' must be a positive int, got 0"),
    ({"meta": {"n_head": 4.0}}, r"\(metadata smdm_model\): field 'n_head' must be a positive int, got 4\.0"),
    ({"meta": {"n_head": True}}, r"\(metadata smdm_model\): field 'n_head' must be a positive int, got True"),
    ({"meta": {"max_seq_len": "x"}}, r"field 'max_seq_len' must be a positive int, got 'x'"),
    ({"meta": {"max_seq_len": -3}}, r"field 'max_seq_len' must be a positive int, got -3"),
    ({"meta": {"rope_base": "abc"}}, r"field 'rope_base' must be a positive float, got 'abc'"),
    ({"meta": {"causal": "yes"}}, r"field 'causal' must be true or false, got 'yes'"),
    ({"meta": "{not json"}, r"w\.safetensors \(metadata smdm_model\): not a JSON object"),
    # litgpt's model_config.yaml: integers are ints (not 4.0, not "4", not true), only a missing value defaults
    ({"yaml_line": "n_head: 4.0"}, r"ckpt/model_config\.yaml: field 'n_head' must be a positive int, got 4\.0"),
    ({"yaml_line": 'n_head: "4"'}, r"model_config\.yaml: field 'n_head' must be a positive int, got '4'"),
    ({"yaml_line": "n_head: 0"}, r"model_config\.yaml: field 'n_head' must be a positive int, got 0"),
    ({"yaml_line": "n_query_groups: true"}, r"field 'n_query_groups' must be a positive int, got True"),
    ({"yaml_line": "block_size: 0"}, r"model_config\.yaml: field 'block_size' must be a positive int, got 0"),
    ({"yaml_line": "rope_base: abc"}, r"model_config\.yaml: field 'rope_base' must be a positive float, got 'abc'"),
    ({"yaml_line": "norm_eps: -1.0e-5"}, r"field 'norm_eps' must be a positive float, got -1e-05"),
    ({"yaml_line": "head_size: x"}, r"field 'head_size' must be a positive int, got 'x'"),
    # tensors: floating point (an int weight made a checkpoint smdm.load cannot load), matrices where read as such
    ({"edit": {"transformer.h.1.norm_1.weight": torch.ones(64, dtype=torch.int64)}},
     r"w\.safetensors: transformer\.h\.1\.norm_1\.weight has dtype int64; model weights must be floating point"),
    ({"edit": {"lm_head.weight": torch.zeros(30)}},
     r"w\.safetensors: lm_head\.weight has shape \(30,\), expected a matrix \(2 dims\)"),
    ({"edit": {"transformer.wte.weight": torch.zeros(30)}},
     r"transformer\.wte\.weight has shape \(30,\), expected a matrix"),
    ({"edit": {"transformer.h.0.attn.attn.weight": torch.zeros(128)}},
     r"transformer\.h\.0\.attn\.attn\.weight has shape \(128,\), expected a matrix"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS, ids=[f"{k}={next(iter(v)) if k == 'edit' else v}"
                                                              for r, _ in BAD_RECORDS for k, v in r.items()])
def test_bad_records_and_tensors_name_the_file_and_field(tmp_path, capsys, record, message):
    """What a file says about its config is checked field by field (type and range, the bad value as repr) and its
    tensors by dtype and rank: each was a traceback (TypeError, ZeroDivisionError, unpacking errors) or a
    checkpoint that `smdm.load` could not load. One line, exit 2, nothing written."""
    if "yaml_line" in record:
        pytest.importorskip("yaml")
    src = _record(tmp_path, **record)
    heads = ["--n-head", "4"] if "edit" in record else []  # else from the record
    assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "out"), *heads]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smdm convert: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_null_or_missing_litgpt_field_takes_the_default(tmp_path):
    """Absent or null (YAML `~`) is the default (block_size 2048, norm_eps 1e-5), as in config.json files."""
    pytest.importorskip("yaml")
    src = _record(tmp_path, yaml_line="norm_eps: null\nblock_size: ~")
    assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "out")]) == 0
    model = ckpt.read_config(ckpt.resolve(tmp_path / "out"))["model"]
    assert (model["n_head"], model["n_kv_head"], model["max_seq_len"], model["norm_eps"]) == (4, 2, 2048, 1e-5)
    # a hand-written `norm_eps: 1e-6` (PyYAML reads an exponent without a dot as a string) is the number
    (tmp_path / "hand").mkdir()
    src = _record(tmp_path / "hand", yaml_line="norm_eps: 1e-6")
    assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "out2")]) == 0
    assert ckpt.read_config(ckpt.resolve(tmp_path / "out2"))["model"]["norm_eps"] == 1e-6


def test_to_litgpt_checks_the_suffix_of_the_name_given(tmp_path):
    """`--out model.safetensors` that is a link to a blob without the suffix: the name given is what counts
    (it was refused after the link was followed, naming a suffix the user had given)."""
    from smdm.convert import export_litgpt

    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_bytes(b"")
    (tmp_path / "model.safetensors").symlink_to(blob)
    cfg = config_by_name("tiny", vocab_size=23)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg, seed=0).state_dict(),
              config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    export_litgpt(tmp_path / "run", tmp_path / "model.safetensors", overwrite=True)
    assert blob.stat().st_size > 0 and (tmp_path / "model.safetensors").is_symlink()


@pytest.mark.parametrize("direction", ["to-litgpt", "to-hf"])
@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("model"), r"run/step-1/config\.json: bad model config \(no 'model' object\)"),
    (lambda c: c["model"].update(extra=1), r"run/step-1/config\.json: bad model config \(.*'extra'"),
    (lambda c: c["model"].update(n_head=4.0),
     r"run/step-1/config\.json \(model\): field 'n_head' must be a positive int, got 4\.0"),
], ids=["no-model", "unknown-field", "float-heads"])
def test_exports_check_the_checkpoints_model_config(tmp_path, capsys, direction, edit, message):
    """to-litgpt read config.json's "model" unchecked (a KeyError / TypeError traceback) where to-hf said "bad
    model config"; both now share one check, which also refuses mistyped fields."""
    cfg = config_by_name("tiny", vocab_size=23)
    conf = {"model": cfg.to_dict(), "objective": "mdm"}
    edit(conf)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg).state_dict(), config=conf, train_state={})
    out = tmp_path / ("out.safetensors" if direction == "to-litgpt" else "out")
    assert cli(["convert", direction, str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture
def exports(tmp_path, monkeypatch):
    """A tiny MDM run, its to-litgpt and to-hf exports, and an empty current directory cwd/ inside tmp_path."""
    cfg = config_by_name("tiny", vocab_size=23)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg).state_dict(),
              config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(tmp_path / "lit.safetensors")]) == 0
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return {"from-litgpt": tmp_path / "lit.safetensors", "from-hf": tmp_path / "hf", "to-litgpt": tmp_path / "run",
            "to-hf": tmp_path / "run"}


@pytest.mark.parametrize("direction,out", [("from-litgpt", "new/../ck"), ("from-hf", "new/../ck"),
                                           ("to-litgpt", "new/../w.safetensors"), ("to-hf", "new/../hf")])
def test_out_paths_are_resolved_first(exports, capsys, direction, out):
    """--out is made absolute and normal before anything is derived from it: "new/.." created new/ and left it."""
    assert cli(["convert", direction, str(exports[direction]), "--out", out]) == 0
    assert sorted(p.name for p in Path.cwd().iterdir()) == [Path(out).name]


@pytest.mark.parametrize("out", [".", "..", "new/..", "../cwd"])
def test_to_hf_refuses_the_current_directory(exports, capsys, out):
    """to-hf renames a finished directory into place: "." was a ValueError (no name to derive a temporary from),
    ".." left its temporary in the cwd and failed with "Device or resource busy". The current directory, or one
    holding it, is refused by name, with --overwrite too; nothing is created."""
    assert cli(["convert", "to-hf", str(exports["to-hf"]), "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: is the current directory or holds it, which cannot be replaced atomically" in err, err
    assert len(err.splitlines()) == 1 and not list(Path.cwd().iterdir()) and not list(Path("..").glob(".*"))


def test_a_symlinked_out_dir_is_written_through(exports, capsys):
    """to-hf --out LINK (a symlink to a directory) writes the link's target, the link stays: it failed naming its
    temporary (".link.tmp-...: Not a directory"), and with --overwrite replaced the link by a directory and left
    the renamed link ".link.old-..." behind."""
    Path("empty").mkdir()
    Path("link").symlink_to("empty")
    assert cli(["convert", "to-hf", str(exports["to-hf"]), "--out", "link"]) == 0
    assert Path("link").is_symlink() and (Path("empty") / "config.json").is_file()
    (Path("empty") / "stale.txt").write_text("x")
    assert cli(["convert", "to-hf", str(exports["to-hf"]), "--out", "link"]) == 2  # not empty: --overwrite
    assert "--out link: exists and is not empty" in capsys.readouterr().err
    assert cli(["convert", "to-hf", str(exports["to-hf"]), "--out", "link", "--overwrite"]) == 0
    assert Path("link").is_symlink() and os.readlink("link") == "empty"
    assert not (Path("empty") / "stale.txt").exists() and (Path("empty") / "config.json").is_file()
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["empty", "link"]  # no .tmp / .old debris


# ---------------------------------------------------------------------------------------------------------
# against the real litgpt GPT from PyPI

ROOT = Path(__file__).resolve().parents[1]
LITGPT_LAYOUT = {"0.2.0": "litgpt-grouped", "0.5.13": "litgpt"}  # to-litgpt's --layout for each version's GPT
LITGPT_INSTALL = ("pip install 'lightning>=2.6.1' psutil && "
                  "pip install --no-deps --target .litgpt/{v} litgpt=={v}")


@pytest.fixture(scope="module", params=sorted(LITGPT_LAYOUT))
def litgpt(request):
    """The real litgpt package of one version (its `GPT` and `Config`), imported from `.litgpt/VERSION`.

    litgpt cannot be a pip dependency beside torch 2.15 and lm-eval: 0.2.0 pins a lightning nightly that PyPI
    does not have, 0.5.13 pins psutil, jsonargparse and huggingface-hub < 1.4. Its model and config need only
    torch, PyYAML, typing-extensions and, through the package's imports, lightning (and psutil for 0.5.13), so
    each version is installed without its dependencies into its own --target dir (LITGPT_INSTALL) and the two
    take turns in sys.modules: this fixture is module-scoped and removes every `litgpt.*` module when done.
    Missing, the tests skip, or fail where SMDM_REQUIRE_LITGPT is set (scripts/test.sh, CI); lightning and
    psutil come with the `test` extra (Python >= 3.10)."""
    version = request.param
    path = ROOT / ".litgpt" / version

    def unavailable(why):
        msg = f"real litgpt {version} not available ({why}): {LITGPT_INSTALL.format(v=version)}"
        if os.environ.get("SMDM_REQUIRE_LITGPT"):
            pytest.fail(msg)
        pytest.skip(msg)

    if sys.version_info < (3, 10):  # lightning >= 2.6.1 and litgpt 0.5.13 need it; not a failure under CI
        pytest.skip("the real-litgpt tests need Python >= 3.10")
    if not (path / "litgpt" / "__init__.py").is_file():
        unavailable(f"no {path}")
    assert not [m for m in sys.modules if m.split(".")[0] == "litgpt"], "another litgpt is imported"
    sys.path.insert(0, str(path))
    try:
        try:
            model, config = importlib.import_module("litgpt.model"), importlib.import_module("litgpt.config")
        except ImportError as e:  # lightning, or 0.5.13's psutil
            unavailable(f"{type(e).__name__}: {e}")
        assert Path(model.__file__).is_relative_to(path) and importlib.metadata.version("litgpt") == version
        yield SimpleNamespace(version=version, GPT=model.GPT, Config=config.Config)
    finally:
        sys.path.remove(str(path))
        for name in [m for m in sys.modules if m.split(".")[0] == "litgpt"]:
            del sys.modules[name]


def litgpt_model(lit, *, n_query_groups: int, mdm: bool, seed: int = 0, **extra):
    """litgpt's own GPT in TinyLlama's own litgpt config ("tiny-llama-1.1b": RMSNorm eps 1e-5, LLaMAMLP, RoPE
    over the full head dim, no biases, sequential residual), shrunk to 3 layers of width 48, 4 query heads,
    ffn 80, vocab 37; random weights, the norm gains too (so that swapped norms show), float64.
    The MDM is SMDM's TransEncoder: this GPT with one more `transformer.wte` row, the mask token."""
    vocab, d = 37, 48
    config = lit.Config.from_name("tiny-llama-1.1b", n_layer=3, n_embd=d, n_head=4, n_query_groups=n_query_groups,
                                  intermediate_size=80, vocab_size=vocab, padded_vocab_size=vocab, block_size=64,
                                  **extra)
    assert extra or (config.norm_class_name, config.norm_eps, config.mlp_class_name, config.rotary_percentage,
                     config.bias, config.parallel_residual, config.head_size) == \
        ("RMSNorm", 1e-5, "LLaMAMLP", 1.0, False, False, 12)
    model = lit.GPT(config)
    model.lit_config = config
    if mdm:
        model.transformer.wte = torch.nn.Embedding(vocab + 1, d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            std = 0.5 if "wte" in name else 0.2 if "attn" in name and "proj" not in name else 0.05
            p.copy_(1 + 0.1 * noise if "norm" in name or "ln_f" in name else std * noise)
    return model.double().eval()


def _all_true_mask(block, args):
    x, cos, sin, mask, *rest = args  # GPT.forward's positional call: block(x, cos, sin, mask, input_pos, ...)
    assert mask is None  # litgpt's "causal" (no KV cache)
    return (x, cos, sin, torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool), *rest)


def litgpt_logits(model, idx, *, causal: bool):
    """litgpt's own GPT.forward, unedited. Causal as litgpt runs it; bidirectional as SMDM's MDM (its fork calls
    SDPA with is_causal=False): litgpt's blocks take an attention mask (for its KV cache) and read None as causal,
    so a forward pre-hook hands every block an all-True boolean mask (attend everywhere) instead."""
    hooks = [] if causal else [b.register_forward_pre_hook(_all_true_mask) for b in model.transformer.h]
    try:
        with torch.no_grad():
            return model(idx)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("mdm,n_query_groups,fmt", [
    (True, 2, "safetensors"),  # SMDM's MDM with grouped-query heads
    (True, 4, "pth"),  # multi-head
    (False, 2, "pth"),  # the autoregressive twin (TinyLlama's own attention: 32 heads in 4 groups)
    (False, 1, "safetensors"),  # multi-query
])
def test_real_litgpt_gpt_and_smdm_compute_the_same_function(tmp_path, litgpt, mdm, n_query_groups, fmt):
    """litgpt's weights -> from-litgpt -> smdm gives litgpt's logits; to-litgpt -> litgpt's GPT (strict load)
    gives back the very same tensors."""
    model = litgpt_model(litgpt, n_query_groups=n_query_groups, mdm=mdm)
    state = model.state_dict()
    src = tmp_path / f"lit_model.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(src))
    else:
        torch.save(state, src)
    assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "run"), "--n-head", "4"]) == 0
    ours, _ = smdm.load(tmp_path / "run", device="cpu")
    c = ours.config
    assert (c.causal, c.n_layer, c.n_head, c.kv_heads, c.d_model, c.d_ff, c.vocab_size) == \
        (not mdm, 3, 4, n_query_groups, 48, 80, 37)
    idx = torch.randint(0, 37 + mdm, (2, 23), generator=torch.Generator().manual_seed(1))  # the mask id too
    ref = litgpt_logits(model, idx, causal=not mdm)
    with torch.no_grad():
        got = ours.double()(idx)
    # litgpt's RMSNorm and RoPE tables compute in float32 even in a float64 model: errors of 2-4e-7 relative seen
    err = (got - ref).abs().max().item()
    assert err < 2e-6 * ref.abs().max().item(), err
    # the other attention direction differs clearly (the comparison sees the mask)
    assert (litgpt_logits(model, idx, causal=mdm) - ref).abs().max() > 1e-2

    # back: the litgpt layout of this version (0.5.13 also loads the grouped attn.attn of older litgpt)
    layouts = [LITGPT_LAYOUT[litgpt.version]] + (["litgpt-grouped"] if litgpt.version == "0.5.13" else [])
    for layout in layouts:
        out = tmp_path / f"{layout}.safetensors"
        assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(out), "--layout", layout]) == 0
        back = litgpt_model(litgpt, n_query_groups=n_query_groups, mdm=mdm, seed=7)
        back.load_state_dict(load_file(str(out)), strict=True)
        for k, v in back.state_dict().items():
            assert torch.equal(v, state[k]), (layout, k)
        assert torch.equal(litgpt_logits(back, idx, causal=not mdm), ref), layout


def test_litgpt_model_config_next_to_the_weights_is_read(tmp_path, litgpt, capsys):
    """A litgpt checkpoint dir (lit_model.pth + the model_config.yaml litgpt's save_config writes: its Config as
    a dict) with a RoPE base and norm eps other than TinyLlama's (Llama 3's 500000, 1e-6): from-litgpt used
    10000 and 1e-5 whatever the file said (logits off by 4% of their range, silently). Architectures smdm's
    block cannot compute are refused by field."""
    import dataclasses

    import yaml

    model = litgpt_model(litgpt, n_query_groups=2, mdm=False, rope_base=500000, norm_eps=1e-6)
    src = tmp_path / "ckpt" / "lit_model.pth"
    src.parent.mkdir()
    torch.save(model.state_dict(), src)
    (src.parent / "model_config.yaml").write_text(yaml.dump(dataclasses.asdict(model.lit_config)))
    assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / "run")]) == 0  # heads from the file
    ours, _ = smdm.load(tmp_path / "run", device="cpu")
    c = ours.config
    assert (c.rope_base, c.norm_eps, c.n_head, c.kv_heads, c.max_seq_len) == (500000.0, 1e-6, 4, 2, 64)
    idx = torch.randint(0, 37, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = litgpt_logits(model, idx, causal=True)
    with torch.no_grad():
        err = (ours.double()(idx) - ref).abs().max().item()
    assert err < 2e-6 * ref.abs().max().item(), err
    for key, value in (("parallel_residual", True), ("rotary_percentage", 0.25), ("norm_class_name", "LayerNorm")):
        conf = {**dataclasses.asdict(model.lit_config), key: value}
        (src.parent / "model_config.yaml").write_text(yaml.dump(conf))
        assert cli(["convert", "from-litgpt", str(src), "--out", str(tmp_path / f"bad-{key}")]) == 2
        assert f"model_config.yaml: {key} is {value!r}" in capsys.readouterr().err
        assert not (tmp_path / f"bad-{key}").exists()


def test_litgpt_qkv_layout_is_read():
    """A litgpt >= 0.5.5 file (`attn.qkv` = [Q | K | V], LLaMAMLP names) converts to the same smdm weights as the
    grouped file it came from; a file with neither QKV name, or both, is refused by name."""
    from smdm.convert import to_litgpt
    from smdm.model import ModelConfig

    # grouped-query heads: with one key/value head, or one per query head, some wrong orders read right
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, vocab_size=23)
    state = build_model(cfg, seed=2).state_dict()
    for layout in ("smdm", "litgpt-grouped", "litgpt"):
        lit = to_litgpt(state, cfg, layout)
        assert ("transformer.h.1.attn.qkv.weight" in lit) == (layout == "litgpt")
        got = from_litgpt(lit, infer_config(lit, source="w.pt", n_head=4), source="w.pt")
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state), layout
    lit = to_litgpt(state, cfg, "litgpt")
    with pytest.raises(ConvertError, match=r"w\.pt: neither of 'transformer\.h\.0\.attn\.attn\.weight' and "
                                           r"'transformer\.h\.0\.attn\.qkv\.weight'"):
        infer_config({k: v for k, v in lit.items() if "qkv" not in k}, source="w.pt")
    with pytest.raises(ConvertError, match=r"w\.pt: both of .* \(one layout expected\)"):
        infer_config({**lit, "transformer.h.0.attn.attn.weight": lit["transformer.h.0.attn.qkv.weight"]},
                     source="w.pt")
    mixed = {k.replace("h.1.attn.qkv", "h.1.attn.attn"): v for k, v in lit.items()}  # block 1 in the old name
    with pytest.raises(ConvertError, match=r"w\.pt: missing tensor 'transformer\.h\.1\.attn\.qkv\.weight'"):
        from_litgpt(mixed, infer_config(mixed, source="w.pt", n_head=4), source="w.pt")
    with pytest.raises(ConvertError, match="layout must be one of"):
        to_litgpt(state, cfg, "hf")


def test_the_noise_schedule_survives_both_round_trips(tmp_path, capsys):
    """A cosine-trained MDM exported with to-litgpt / to-hf and imported back keeps train.schedule (generate's
    default): before, the import dropped it and generation fell back to linear. --schedule sets it for files
    that record none (or overrides); an ARM has none to set; a bad name is an error naming the option."""
    from smdm.generate_cli import resolve_schedule

    cfg = config_by_name("tiny", vocab_size=23)
    state = {k: v.clone() for k, v in build_model(cfg, seed=3).state_dict().items()}
    ckpt.save(tmp_path / "run", 5, model_state=state, config={"model": cfg.to_dict(), "objective": "mdm",
                                                              "train": {"schedule": "cosine"}},
              train_state={"step": 5})
    args = SimpleNamespace(schedule=None)
    lit, hf = tmp_path / "lit.safetensors", tmp_path / "hf"
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(lit)]) == 0
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(hf)]) == 0
    for direction, src in (("from-litgpt", lit), ("from-hf", hf)):
        back = tmp_path / f"back-{direction}"
        assert cli(["convert", direction, str(src), "--out", str(back)]) == 0
        assert "noise schedule cosine" in capsys.readouterr().out
        assert resolve_schedule(args, ckpt.read_config(ckpt.resolve(back))) == "cosine"
        other = tmp_path / f"other-{direction}"
        assert cli(["convert", direction, str(src), "--out", str(other), "--schedule", "polynomial:2"]) == 0
        assert resolve_schedule(args, ckpt.read_config(ckpt.resolve(other))) == "polynomial:2.0"
        assert cli(["convert", direction, str(src), "--out", str(tmp_path / "bad"), "--schedule", "cubic"]) == 2
        assert "--schedule" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    bare = tmp_path / "bare.safetensors"  # SMDM's own files record none: linear, or --schedule
    save_file(load_file(str(lit)), str(bare))
    assert cli(["convert", "from-litgpt", str(bare), "--out", str(tmp_path / "bare")]) == 0
    assert "train" not in ckpt.read_config(ckpt.resolve(tmp_path / "bare"))
    assert resolve_schedule(args, ckpt.read_config(ckpt.resolve(tmp_path / "bare"))) == "linear"
    arm = config_by_name("tiny", vocab_size=23, causal=True)
    ckpt.save(tmp_path / "arm", 1, model_state=build_model(arm).state_dict(),  # as `smdm train` writes an ARM run
              config={"model": arm.to_dict(), "objective": "ar", "train": {"schedule": "linear"}},
              train_state={"step": 1})
    assert cli(["convert", "to-litgpt", str(tmp_path / "arm"), "--out", str(tmp_path / "arm.safetensors")]) == 0
    # the ARM's recorded "linear" is no schedule: not exported, and the file comes back in (it was refused)
    assert "smdm_schedule" not in safe_open(str(tmp_path / "arm.safetensors"), "pt").metadata()
    assert cli(["convert", "from-litgpt", str(tmp_path / "arm.safetensors"), "--out", str(tmp_path / "arm1")]) == 0
    capsys.readouterr()
    assert cli(["convert", "from-litgpt", str(tmp_path / "arm.safetensors"), "--out", str(tmp_path / "arm2"),
                "--schedule", "cosine"]) == 2
    assert "autoregressive model (no noise schedule)" in capsys.readouterr().err


def test_an_unwritable_out_is_an_error_not_a_traceback(tmp_path, capsys):
    cfg = config_by_name("tiny", vocab_size=23)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg).state_dict(),
              config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    (tmp_path / "file").write_text("x")
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "smdm convert: error: " in err and "Traceback" not in err, err


def test_to_litgpt_never_replaces_a_file_unasked_nor_the_checkpoint(tmp_path, capsys):
    """to-litgpt wrote over any --out, the checkpoint's own model.safetensors included (which destroyed it)."""
    cfg = config_by_name("tiny", vocab_size=23)
    step = ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg).state_dict(),
                     config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"mine")
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 0
    assert set(load_file(str(out))) >= {"transformer.wte.weight", "lm_head.weight"}
    inside = step / "model.safetensors"
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(inside), "--overwrite"]) == 2
    assert "inside the checkpoint being converted" in capsys.readouterr().err
    ckpt.verify(step)


def test_a_failed_write_is_an_error_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not OSError: it escaped as a traceback, and
    ckpt.save left its .tmp-step-* directory behind; the --out dir (or the parents of one) that the failed
    convert created stayed, empty."""
    import safetensors.torch
    from safetensors import SafetensorError

    cfg = config_by_name("tiny", vocab_size=23)
    ckpt.save(tmp_path / "run", 1, model_state=build_model(cfg).state_dict(),
              config={"model": cfg.to_dict(), "objective": "mdm"}, train_state={"step": 1})
    lit = tmp_path / "lit.safetensors"
    assert cli(["convert", "to-litgpt", str(tmp_path / "run"), "--out", str(lit)]) == 0

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for args in (["from-litgpt", str(lit), "--out", str(tmp_path / "new1" / "back")],
                 ["to-litgpt", str(tmp_path / "run"), "--out", str(tmp_path / "new2" / "w2.safetensors")],
                 ["to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "new3" / "sub" / "hf")]):
        assert cli(["convert", *args]) == 2, args
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob(".tmp*")) and not list(tmp_path.glob(".*tmp*"))
    assert not list(tmp_path.glob("new*"))
