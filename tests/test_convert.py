# python -m pytest tests/test_convert.py -q
"""`smdm convert`: lit-gpt / SMDM / TinyLlama weights in and out.

The oracle is an independent forward pass written here from the lit-gpt layout (fused QKV grouped per key/value
head, non-interleaved RoPE, RMSNorm, xformers SwiGLU names), with explicit softmax attention instead of SDPA:
a converted checkpoint loaded by `smdm.load` must give the same logits."""

from __future__ import annotations

import math

import pytest
import smdm
import torch
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
    assert "notes.pth: not a torch state dict" in capsys.readouterr().err
    save_file(sd, str(path))
    assert cli(["convert", "from-litgpt", str(path), "--out", str(tmp_path / "ok")]) == 0
    assert cli(["convert", "from-litgpt", str(path), "--out", str(tmp_path / "ok")]) == 2  # never overwrites
    assert "already holds checkpoints" in capsys.readouterr().err


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


def test_litgpt_qkv_layout_is_read(tmp_path):
    """A litgpt >= 0.5.5 file (`attn.qkv` = [Q | K | V], LLaMAMLP names) converts to the same smdm weights as the
    grouped file it came from; a file with neither QKV name, or both, is refused by name."""
    from smdm.convert import to_litgpt

    cfg = config_by_name("tiny", vocab_size=23, causal=False, n_kv_head=1)
    state = build_model(cfg, seed=2).state_dict()
    for layout in ("smdm", "litgpt-grouped", "litgpt"):
        lit = to_litgpt(state, cfg, layout)
        assert ("transformer.h.1.attn.qkv.weight" in lit) == (layout == "litgpt")
        got = from_litgpt(lit, infer_config(lit, source="w.pt"), source="w.pt")
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
        from_litgpt(mixed, infer_config(mixed, source="w.pt"), source="w.pt")
    with pytest.raises(ConvertError, match="layout must be one of"):
        to_litgpt(state, cfg, "hf")
