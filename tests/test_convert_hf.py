# python -m pytest tests/test_convert_hf.py -q
"""`smdm convert to-hf` / `from-hf` against the real transformers package (no mocks).

The ARM twin must load as transformers' own `LlamaForCausalLM` and the MDM through `AutoModelForMaskedLM` with
the model code smdm ships (python/smdm/hf/, trust_remote_code), both giving smdm's logits; a round trip is bit
for bit; plain transformers Llama directories (sharded too) convert in. Tiny random-weight models, compared in
float64 and float32. In float64, transformers computes RMSNorm and the RoPE tables in float32 anyway, so its
logits differ from smdm's by up to 1e-6 of their scale (measured 6-8e-7 with transformers 5.24 and torch 2.15;
the bound `REL` is 2e-6). In float32 both compute the same operations in the same order: the logits were
bit-identical here; the bound `REL32` leaves room for other kernels."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import smdm
import torch
from safetensors.torch import load_file, save_file
from smdm import checkpoint as ckpt
from smdm.cli import main as cli
from smdm.convert import HF_MASK_TOKEN, ConvertError, export_hf, import_hf
from smdm.model import ModelConfig, Transformer

# transformers copies the remote code it loads into its modules cache (a path fixed when it is imported): one of this
# process's own, never the user's ~/.cache, and no two pytest-xdist workers copying the same files at once
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="smdm-test-hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)
if sys.version_info < (3, 10):  # transformers 5 needs Python >= 3.10
    transformers = pytest.importorskip("transformers", minversion="5")
else:
    import transformers

REL = 2e-6  # float64: |transformers - smdm| / max |logit| (see the module docstring)
REL32 = 1e-5  # float32
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, tiny_texts):
    """A byte-level BPE tokenizer.json with smdm's EOS as its special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def vocab_of(tokenizer_path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """smdm's model with weights that make every mapping error show: norm gains around 1 (swapped norms show),
    large query/key weights (peaked attention: a permutation of q/k rows or the wrong mask shows)."""
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            std = 0.5 if name == "embed.weight" else 0.25 if "qkv" in name else 0.08
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    return model.eval()


def save_run(root: Path, cfg: ModelConfig, tokenizer=None, seed: int = 0) -> tuple:
    model = random_model(cfg, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save(root, 3, model_state=state, config={"model": cfg.to_dict(), "objective": "ar" if cfg.causal else "mdm"},
              train_state={"step": 3}, tokenizer_path=tokenizer)
    return model, state


def config(vocab: int, *, causal: bool, n_kv: int = 2, **kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 3, "n_head": 4, "n_kv_head": n_kv, "d_model": 48, "d_ff": 80, "vocab_size": vocab,
                          "max_seq_len": 64, "causal": causal, **kw})


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# logits


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_arm_twin_loads_as_transformers_llama(tmp_path, tokenizer_path, n_kv):
    V = vocab_of(tokenizer_path)
    cfg = config(V, causal=True, n_kv=n_kv, rope_base=500.0, norm_eps=1e-6)
    model, _ = save_run(tmp_path / "run", cfg, tokenizer_path)
    out = tmp_path / "hf"
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]  # no code: plain transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert type(hf) is transformers.LlamaForCausalLM
    c = hf.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings, c.rms_norm_eps, c.tie_word_embeddings) == \
        (3, 4, n_kv, 48, 80, V, 64, 1e-6, False)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert c.eos_token_id == json.loads(tokenizer_path.read_text())["added_tokens"][0]["id"]
    idx = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.double()(idx), hf(idx).logits
    assert theirs.shape == (2, 29, V)
    assert max_err(ours, theirs) < REL * ours.abs().max().item(), max_err(ours, theirs)
    with torch.no_grad():
        hf32 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours32, theirs32 = model.float()(idx), hf32(idx).logits
    assert max_err(ours32, theirs32) < REL32 * ours.abs().max().item(), max_err(ours32, theirs32)
    model = model.double()
    # causal in both: a later token leaves the earlier positions alone and changes its own
    later = idx.clone()
    later[:, -1] = (later[:, -1] + 1) % V
    with torch.no_grad():
        for f in (lambda x: model(x), lambda x: hf(x).logits):
            a, b = f(idx), f(later)
            assert max_err(a[:, :-1], b[:, :-1]) < 1e-12 and max_err(a[:, -1], b[:, -1]) > 1e-3


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_mdm_loads_with_its_remote_code(tmp_path, tokenizer_path, n_kv):
    V = vocab_of(tokenizer_path)
    cfg = config(V, causal=False, n_kv=n_kv)
    model, _ = save_run(tmp_path / "run", cfg, tokenizer_path)
    out = tmp_path / "hf"
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert (conf["model_type"], conf["architectures"], conf["vocab_size"], conf["mask_token_id"]) == \
        ("smdm", ["SmdmForMaskedLM"], V + 1, V)
    for name in ("modeling_smdm.py", "configuration_smdm.py"):  # what a Hub user runs needs no smdm
        code = (out / name).read_text()
        assert "import smdm" not in code and "from smdm" not in code
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float64).eval()
    assert type(hf).__name__ == "SmdmForMaskedLM" and type(hf).__module__.startswith("transformers_modules")
    assert sys.modules[type(hf).__module__].__file__.startswith(os.environ["HF_MODULES_CACHE"])
    assert hf.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V + 1, (2, 29), generator=g)  # the mask id V included
    idx[:, ::3] = V
    model = model.double()
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert theirs.shape == (2, 29, V)  # the head: every token but the mask
    assert max_err(ours, theirs) < REL * ours.abs().max().item(), max_err(ours, theirs)
    with torch.no_grad():
        hf32 = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        ours32, theirs32 = model.float()(idx), hf32.eval()(idx).logits
    assert max_err(ours32, theirs32) < REL32 * ours.abs().max().item(), max_err(ours32, theirs32)
    model = model.double()
    # bidirectional in both: the last token changes the first position's logits
    later = idx.clone()
    later[:, -1] = (later[:, -1] + 1) % V
    with torch.no_grad():
        ours2, theirs2 = model(later), hf(later).logits
    assert max_err(ours[:, 0], ours2[:, 0]) > 1e-3 and max_err(theirs[:, 0], theirs2[:, 0]) > 1e-3
    assert max_err(ours2, theirs2) < REL * ours2.abs().max().item()
    # padding: transformers' attention_mask hides keys as smdm's key_valid does (the real positions agree)
    keep = torch.ones(2, 29, dtype=torch.long)
    keep[1, 20:] = 0
    with torch.no_grad():
        ours_pad = model(idx, key_valid=keep.bool())
        theirs_pad = hf(idx, attention_mask=keep).logits
    assert max_err(ours_pad[0], theirs_pad[0]) < REL * ours_pad.abs().max().item()
    assert max_err(ours_pad[1, :20], theirs_pad[1, :20]) < REL * ours_pad.abs().max().item()
    assert max_err(ours_pad[1, :20], ours[1, :20]) > 1e-3  # the padding keys did matter
    # the eager attention path, the base model's hidden states and the masked-LM loss
    eager = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
    base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float64).eval()
    labels = torch.where(idx == V, torch.randint(0, V, idx.shape, generator=g), -100)
    with torch.no_grad():
        assert max_err(eager(idx).logits, ours) < REL * ours.abs().max().item()
        h = base(idx).last_hidden_state
        assert max_err(h, model.hidden(idx)) < REL * h.abs().max().item()
        loss = hf(idx, labels=labels).loss
    mask = labels != -100
    want = torch.nn.functional.cross_entropy(ours[mask], labels[mask])
    assert abs(loss.item() - want.item()) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# tokenizer, round trip, plain transformers directories


def test_tokenizer_loads_with_autotokenizer(tmp_path, tokenizer_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    V = tok.get_vocab_size()
    text = "def f3(x):\n    return x * 3  # naïve café\n"
    for causal in (True, False):
        save_run(tmp_path / f"run{causal}", config(V, causal=causal), tokenizer_path)
        out = tmp_path / f"hf{causal}"
        export_hf(tmp_path / f"run{causal}", out)
        assert (out / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()  # copied as it is
        # the MDM's config.json names a model type transformers does not know: AutoTokenizer reads it, so it
        # asks for trust_remote_code as for any such model (the tokenizer itself is plain `tokenizers`)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=not causal)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids, skip_special_tokens=False) == text
        assert (hf_tok.eos_token, hf_tok.eos_token_id) == (EOS, tok.token_to_id(EOS))
        assert hf_tok.model_max_length == 64
        if causal:
            assert hf_tok.mask_token is None and len(hf_tok) == V
        else:  # the mask token is the added id V, the config's mask_token_id, the embedding's last row
            assert (hf_tok.mask_token, hf_tok.mask_token_id, len(hf_tok)) == (HF_MASK_TOKEN, V, V + 1)
            conf = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
            assert conf.mask_token_id == V and conf.vocab_size == V + 1
            assert hf_tok("x =" + HF_MASK_TOKEN * 2)["input_ids"][-2:] == [V, V]
            # saved back by transformers (save_pretrained, push_to_hub): the tokenizer now holds the mask token,
            # V + 1 tokens; from-hf and to-hf again take it (from-hf said "V + 1 tokens, but ... V outputs")
            model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
            again = tmp_path / "again"
            model.save_pretrained(again)
            hf_tok.save_pretrained(again)
            assert json.loads((again / "tokenizer.json").read_text())["added_tokens"][-1]["content"] == HF_MASK_TOKEN
            back = import_hf(again, tmp_path / "back")
            assert torch.equal(ckpt.load_weights(back)["head.weight"],
                               ckpt.load_weights(ckpt.resolve(tmp_path / f"run{causal}"))["head.weight"])
            export_hf(tmp_path / "back", tmp_path / "hf-again")
            assert json.loads((tmp_path / "hf-again" / "tokenizer_config.json").read_text())["mask_token"] == \
                HF_MASK_TOKEN
    # a tokenizer with fewer tokens than the model's vocabulary cannot hold the mask at id V: none is named
    notes = []
    save_run(tmp_path / "wide", config(V + 5, causal=False), tokenizer_path)
    export_hf(tmp_path / "wide", tmp_path / "hf-wide", log=notes.append)
    assert "mask_token" not in json.loads((tmp_path / "hf-wide" / "tokenizer_config.json").read_text())
    assert len(notes) == 1 and f"put id {V + 5}" in notes[0]
    # no tokenizer in the checkpoint: no tokenizer files, and bos/eos null (not LlamaConfig's 1 and 2)
    save_run(tmp_path / "bare", config(40, causal=True))
    export_hf(tmp_path / "bare", tmp_path / "hf-bare", log=notes.append)
    assert not (tmp_path / "hf-bare" / "tokenizer.json").exists() and "no tokenizer.json" in notes[-1]
    conf = transformers.AutoConfig.from_pretrained(tmp_path / "hf-bare")
    assert conf.bos_token_id is None and conf.eos_token_id is None


def test_round_trip_is_bit_identical(tmp_path, tokenizer_path):
    """to-hf -> from-hf gives back every tensor bit for bit and the same model config (heads, context, RoPE
    base, norm eps), also through bfloat16; the checkpoint is one smdm.load reads."""
    V = vocab_of(tokenizer_path)
    for causal in (True, False):
        for n_kv in (None, 2):
            cfg = config(V, causal=causal, n_kv=n_kv, rope_base=2500.0, norm_eps=3e-6, max_seq_len=96)
            tag = f"{causal}-{n_kv}"
            _, state = save_run(tmp_path / f"run{tag}", cfg, tokenizer_path)
            for dtype in ("keep", "bfloat16"):
                hf, back = tmp_path / f"hf{tag}{dtype}", tmp_path / f"back{tag}{dtype}"
                assert cli(["convert", "to-hf", str(tmp_path / f"run{tag}"), "--out", str(hf), "--dtype", dtype]) == 0
                assert cli(["convert", "from-hf", str(hf), "--out", str(back)]) == 0
                step = ckpt.resolve(back)
                saved = ckpt.read_config(step)
                assert saved["model"] == cfg.to_dict() and saved["objective"] == ("ar" if causal else "mdm")
                again = ckpt.load_weights(step)
                want = {k: v if dtype == "keep" else v.to(torch.bfloat16) for k, v in state.items()}
                assert set(again) == set(want)
                for k in want:
                    assert again[k].dtype == want[k].dtype and torch.equal(again[k], want[k]), (tag, dtype, k)
                assert (step / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
                model, tok = smdm.load(back, device="cpu")
                assert tok is not None and model.config == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left


def llama(tmp_path: Path, name: str, *, tie: bool = False, n_kv: int = 2, vocab: int = 61, seed: int = 0, **kw):
    """A transformers LlamaForCausalLM of its own random init, saved by transformers itself."""
    torch.manual_seed(seed)
    conf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128,
                                    tie_word_embeddings=tie, **kw)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():  # peaked attention and norm gains away from 1, as in `random_model`
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif "q_proj" in pname or "k_proj" in pname:
                p.normal_(0.0, 0.25)
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size="20KB")
    return model, out


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_plain_sharded_llama_dir_converts(tmp_path, tie):
    hf, out = llama(tmp_path, "llama", tie=tie, rope_parameters={"rope_type": "default", "rope_theta": 800.0},
                    rms_norm_eps=1e-5)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # really sharded
    assert ("lm_head.weight" in index["weight_map"]) == (not tie)
    assert cli(["convert", "from-hf", str(out), "--out", str(tmp_path / "run")]) == 0
    model, tok = smdm.load(tmp_path / "run", device="cpu")
    assert tok is None
    c = model.config
    assert (c.causal, c.n_layer, c.n_head, c.kv_heads, c.d_model, c.d_ff, c.vocab_size, c.max_seq_len, c.rope_base,
            c.norm_eps) == (True, 2, 4, 2, 48, 72, 61, 128, 800.0, 1e-5)
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(2))
    hf = hf.double()
    with torch.no_grad():
        ours, theirs = model.double()(idx), hf(idx).logits
    assert max_err(ours, theirs) < REL * ours.abs().max().item(), max_err(ours, theirs)
    if tie:
        assert torch.equal(model.head.weight, model.embed.weight)
    # --mdm needs the mask row, which an autoregressive Llama does not have
    why = (r"field 'tie_word_embeddings' is true, but an MDM's head cannot share its embedding" if tie else
           r"--mdm needs an embedding with one more row .* model\.embed_tokens\.weight has 61 rows and "
           r"lm_head\.weight 61: an autoregressive Llama")
    with pytest.raises(ConvertError, match=r"llama/config\.json: " + why):
        import_hf(out, tmp_path / "mdm", mdm=True)


def test_tied_config_with_its_own_head_converts_as_transformers_computes_it(tmp_path):
    """config.json says tie_word_embeddings but the files hold an lm_head.weight of their own: transformers 5
    does not tie weights that differ (it warns and keeps the files' head), and the conversion computes the same
    function (checked because a review expected the tie)."""
    _, out = llama(tmp_path, "llama")
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "tie_word_embeddings": True}))
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval().double()
    assert cli(["convert", "from-hf", str(out), "--out", str(tmp_path / "run")]) == 0
    model, _ = smdm.load(tmp_path / "run", device="cpu")
    assert not torch.equal(model.head.weight, model.embed.weight)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model.double()(idx), theirs_model(idx).logits
    assert max_err(ours, theirs) < REL * ours.abs().max().item(), max_err(ours, theirs)


def test_plain_llama_dir_with_the_mask_row_is_an_mdm_with_mdm_flag(tmp_path):
    """A Llama-named directory whose embedding has the extra row (smdm's MDM tensors under a llama config.json)
    is read as an MDM with --mdm, and refused without it."""
    V = 37
    cfg = config(V, causal=False)
    model, state = save_run(tmp_path / "run", cfg)
    export_hf(tmp_path / "run", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    conf.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("auto_map", "mask_token_id"):
        del conf[key]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConvertError, match=r"hf/config\.json: model\.embed_tokens\.weight has 38 rows, "
                                           r"lm_head\.weight 37: the extra row of an MDM's mask token\? "
                                           r"\(convert it with --mdm\)"):
        import_hf(tmp_path / "hf", tmp_path / "arm")
    step = import_hf(tmp_path / "hf", tmp_path / "mdm", mdm=True)
    assert ckpt.read_config(step)["model"] == cfg.to_dict()
    again = ckpt.load_weights(step)
    assert all(torch.equal(again[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------
# errors


def test_the_mdm_mask_id_is_the_last_id(tmp_path):
    """The MDM's config.json says mask_token_id = vocab_size - 1 (smdm's id V); another value is refused by the
    remote code and by from-hf, naming the field."""
    save_run(tmp_path / "run", config(30, causal=False))
    export_hf(tmp_path / "run", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    conf = json.loads(path.read_text())
    assert (conf["vocab_size"], conf["mask_token_id"]) == (31, 30)
    path.write_text(json.dumps({**conf, "mask_token_id": 0}))
    with pytest.raises(ValueError, match=r"config\.mask_token_id is 0: smdm's MDM reads the mask as the last id, "
                                         r"vocab_size - 1 = 30"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    with pytest.raises(ConvertError, match=r"hf/config\.json: field 'mask_token_id' is 0; smdm's MDM reads the "
                                           r"mask as the last id, vocab_size - 1 = 30"):
        import_hf(tmp_path / "hf", tmp_path / "back")
    path.write_text(json.dumps({**conf, "mask_token_id": "30"}))  # a string, shown as one
    with pytest.raises(ConvertError, match=r"field 'mask_token_id' is '30'; smdm's MDM reads the mask as the last id"):
        import_hf(tmp_path / "hf", tmp_path / "back")


def test_bad_inputs_name_the_file_and_field(tmp_path, capsys):
    _, good = llama(tmp_path, "good", vocab=40)
    conf0 = json.loads((good / "config.json").read_text())

    def variant(name, conf=None, drop=(), edit=None):
        """a copy of `good` with another config.json, tensors dropped from / changed in its shards"""
        d = tmp_path / name
        d.mkdir()
        for p in good.iterdir():
            if p.suffix == ".safetensors":
                tensors = {k: v for k, v in load_file(str(p)).items() if k not in drop}
                for k in list(tensors):
                    if edit and k in edit:
                        tensors[k] = edit[k]
                save_file(tensors, str(d / p.name), metadata={"format": "pt"})
            else:
                (d / p.name).write_bytes(p.read_bytes())
        if conf is not None:
            (d / "config.json").write_text(json.dumps(conf))
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k not in drop}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return d

    def fails(d, pattern, **kw):
        with pytest.raises(ConvertError, match=pattern):
            import_hf(d, tmp_path / f"out-{d.name}", **kw)

    fails(variant("nohidden", {k: v for k, v in conf0.items() if k != "hidden_size"}),
          r"nohidden/config\.json: missing field 'hidden_size'")
    fails(variant("gpt2", {**conf0, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
          r"gpt2/config\.json: field 'architectures' is \['GPT2LMHeadModel'\] \(model_type 'gpt2'\)")
    fails(variant("ffn", {**conf0, "intermediate_size": 96}),
          r"ffn/model-\d+-of-\d+\.safetensors: model\.layers\.0\.mlp\.gate_proj\.weight has shape \(72, 48\), "
          r"expected \(96, 48\)")
    fails(variant("heads", {**conf0, "num_key_value_heads": 4}),
          r"heads/model-\d+-of-\d+\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has shape \(24, 48\), "
          r"expected \(48, 48\)")
    fails(variant("scaled", {**conf0, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
          r"scaled/config\.json: field 'rope_parameters' is .*linear")
    fails(variant("llama3", {**conf0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
          r"llama3/config\.json: field 'rope_scaling' is .*llama3")
    fails(variant("gelu", {**conf0, "hidden_act": "gelu"}), r"gelu/config\.json: field 'hidden_act' is 'gelu'")
    fails(variant("bias", {**conf0, "attention_bias": True}), r"bias/config\.json: field 'attention_bias' is true")
    fails(variant("headdim", {**conf0, "head_dim": 16}), r"headdim/config\.json: field 'head_dim' is 16")
    # each message names the file once (a field error was wrapped again: "X/config.json: X/config.json: field")
    fails(variant("eps", {**conf0, "rms_norm_eps": "small"}),
          r"^[^:]*eps/config\.json: field 'rms_norm_eps' must be a positive float, got 'small'$")
    fails(variant("eps0", {**conf0, "rms_norm_eps": 0}),
          r"^[^:]*eps0/config\.json: field 'rms_norm_eps' must be a positive float, got 0$")
    fails(variant("layers", {**conf0, "num_hidden_layers": "2"}),
          r"^[^:]*layers/config\.json: field 'num_hidden_layers' must be a positive int, got '2'$")
    # bad values as repr: the string "12" is not shown as the number it is not
    fails(variant("headdimstr", {**conf0, "head_dim": "12"}),
          r"headdimstr/config\.json: field 'head_dim' must be a positive int, got '12'")
    fails(variant("archstr", {**conf0, "architectures": "LlamaForCausalLM"}),
          r"archstr/config\.json: field 'architectures' must be a list of class names, got 'LlamaForCausalLM'")
    fails(variant("sched", {**conf0, "smdm_schedule": 3}),  # was dropped silently
          r"sched/config\.json: field 'smdm_schedule' must be a schedule name \(a string\), got 3")
    fails(variant("intweight", edit={"model.norm.weight": torch.ones(48, dtype=torch.int32)}),
          r"intweight/model-\d+-of-\d+\.safetensors: model\.norm\.weight has dtype int32; model weights must be "
          r"floating point")
    fails(variant("missing", drop={"model.layers.1.self_attn.k_proj.weight"}),
          r"missing: missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'")
    fails(variant("extra", edit=None, drop=(), conf={**conf0, "num_hidden_layers": 1}),
          r"extra/model-\d+-of-\d+\.safetensors: 9 tensor\(s\) this model has no place for")
    shard = variant("lost")
    lost = sorted(json.loads((shard / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (shard / lost).unlink()
    fails(shard, rf"lost/model\.safetensors\.index\.json: its weight_map names {lost}, which does not exist")
    moved = variant("moved")
    index = json.loads((moved / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = sorted(set(index["weight_map"].values()))[0]
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(moved, r"moved/model\.safetensors\.index\.json: its weight_map puts 'model\.norm\.weight' in")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(conf0))
    fails(empty, r"empty: no model\.safetensors, model\.safetensors\.index\.json or \*\.safetensors")
    (empty / "config.json").write_text("{not json")
    fails(empty, r"empty/config\.json: not valid JSON")
    # the command line: exit code 2 and the message, no traceback
    assert cli(["convert", "from-hf", str(tmp_path / "nohidden"), "--out", str(tmp_path / "x")]) == 2
    assert "nohidden/config.json: missing field 'hidden_size'" in capsys.readouterr().err


def test_to_hf_never_overwrites_without_asking(tmp_path, capsys):
    save_run(tmp_path / "run", config(30, causal=True))
    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is fine
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    save_run(tmp_path / "run2", config(30, causal=True), seed=5)
    assert cli(["convert", "to-hf", str(tmp_path / "run2"), "--out", str(out)]) == 2
    assert f"--out {out}: exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    (out / "stale.txt").write_text("from before")
    assert cli(["convert", "to-hf", str(tmp_path / "run2"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != before and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run", "run2"]  # no temporary dirs left
    assert cli(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "holds the checkpoint being converted" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="exists and is not a directory"):
        export_hf(tmp_path / "run", tmp_path / "file", overwrite=True)


# ---------------------------------------------------------------------------------------------------------
# generation and the command line


def test_hf_greedy_generate_matches_smdm_generate(tmp_path, tokenizer_path):
    """The exported ARM twin under transformers' `generate()` (greedy, its own KV cache) writes the tokens that
    `smdm.generate` (temperature 0, smdm's static KV cache) writes."""
    V = vocab_of(tokenizer_path)
    model, _ = save_run(tmp_path / "run", config(V, causal=True), tokenizer_path, seed=4)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    hf.generation_config.eos_token_id = None  # all 16 tokens, as smdm.generate without eos_id
    model = model.double()
    prompts = [[5, 17, 42, 99, 7], list(range(60, 80, 2))]
    want = smdm.generate(model, prompts, gen_length=16, temperature=0.0).tokens
    for prompt, tokens in zip(prompts, want):
        got = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        assert got == tokens
        assert len(set(tokens)) > 2  # not a single repeated token


def test_command_line_end_to_end(tmp_path, tokenizer_path):
    """`python -m smdm.cli convert to-hf / from-hf` in subprocesses, then `smdm generate` on what came back."""
    V = vocab_of(tokenizer_path)
    save_run(tmp_path / "run", config(V, causal=False), tokenizer_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def smdm_cli(*argv):
        proc = subprocess.run([sys.executable, "-m", "smdm.cli", *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = smdm_cli("convert", "to-hf", tmp_path / "run", "--out", tmp_path / "hf", "--dtype", "float32")
    assert "SmdmForMaskedLM" in out and "trust_remote_code=True" in out
    out = smdm_cli("convert", "from-hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert "MDM, 3 layers, 4 heads (2 kv), width 48, ffn 80" in out
    out = smdm_cli("generate", "--ckpt", tmp_path / "back", "--prompt", "def f", "--gen-length", "8", "--steps", "4",
                   "--device", "cpu", "--json")
    assert len(json.loads(out)["tokens"][0]) <= 8
    # transformers stays an optional import: neither `import smdm` nor the export itself imports it
    code = ("import sys, smdm, smdm.cli, smdm.convert; smdm.convert.export_hf(sys.argv[1], sys.argv[2]); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "hf2")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "hf2" / "modeling_smdm.py").is_file(), proc.stderr
