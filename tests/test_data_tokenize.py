# python -m pytest -q tests/test_data_tokenize.py
"""Tokenize + pack in Rust (the `tokenizers` crate + smdm's byte-level fast path) gives exactly the ids of
the Python `tokenizers` package on the same tokenizer.json, and packing equals the numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smdm import SmdmFormatError, SmdmIOError, _core
from smdm import data as D


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_texts):
    """(rust tokenizer, python tokenizer, path) of a byte-level BPE trained by smdm."""
    tok = _core.Tokenizer.train_bpe(tiny_texts, 320)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(tok.to_json())
    return _core.Tokenizer.from_file(str(path)), D.load_tokenizer(str(path), as_data=True), path


TRICKY = [
    "",
    " ",
    "   ",
    "a  b",
    "a \n b",
    "x\n\n\ny",
    "\u3000z \u3000",
    "it's 'll ' s 'S",
    "1 2  3 ４５",
    "tab\t\tend  ",
    "text <|endoftext|> more",
    "<|endoftext|>",
    "émoji 🙂🙂 ok",
    "\xa0\xa0x",
    "Ǆ ǅ ǆ ʰ ⅷ",
    "\r\n\r\n  def f():\r\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _py_ids(py, texts):
    return [e.ids for e in py.encode_batch(texts, add_special_tokens=False)]


def test_trained_tokenizer_basics(trained):
    rust, py, _ = trained
    assert rust.vocab_size == 320 == py.get_vocab_size(with_added_tokens=True)
    assert rust.eos_id == py.token_to_id("<|endoftext|>") == 0
    assert rust.bos_id is None


def test_ids_equal_python_tokenizers(trained, tiny_texts):
    rust, py, _ = trained
    texts = tiny_texts + TRICKY
    assert rust.encode(texts) == _py_ids(py, texts)


def test_encode_pack_equals_python_encode_batch_plus_numpy(trained, tiny_texts):
    rust, py, _ = trained
    texts = tiny_texts[:50] + TRICKY
    stream, starts = rust.encode_pack(texts)
    ids = _py_ids(py, texts)
    want = np.concatenate([np.array(i + [rust.eos_id], np.uint16) for i in ids])
    assert stream.dtype == np.uint16 and np.array_equal(stream, want)
    assert np.array_equal(starts, np.cumsum([0] + [len(i) + 1 for i in ids[:-1]]))


def test_crate_path_equals_fast_path(trained, tiny_texts, monkeypatch):
    rust, _, _ = trained
    texts = tiny_texts[:30] + TRICKY
    fast = rust.encode(texts)
    monkeypatch.setenv("SMDM_REFERENCE", "1")  # the crate's own encode, no smdm fast path
    assert rust.encode(texts) == fast


def test_long_documents_equal_python_tokenizers(trained, tiny_texts):
    """Documents far over the fast path's 64 KiB segments (cut inside, see tokenize.rs) keep the ids of the
    whole document, whatever the whitespace around the cuts."""
    rust, py, _ = trained
    seps = ["", "\n\n   ", " \u3000 ", "\t\r\n\xa0"]
    texts = [sep.join(tiny_texts * 6) + sep for sep in seps]
    texts.append("".join(t for t in TRICKY if "<|" not in t) * 2000)  # no added token: the fast path
    assert min(len(t) for t in texts) > 150_000
    stream, starts = rust.encode_pack(texts)
    ids = _py_ids(py, texts)
    want = np.concatenate([np.array(i + [rust.eos_id], np.uint16) for i in ids])
    assert np.array_equal(stream, want)
    assert np.array_equal(starts, np.cumsum([0] + [len(i) + 1 for i in ids[:-1]]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), min_size=1, max_size=8))
def test_random_text_ids_equal_python(trained, texts):
    rust, py, _ = trained
    assert rust.encode(texts) == _py_ids(py, texts)


def test_foreign_tokenizer_json_with_eos_name(tmp_path):
    """A WordLevel tokenizer (no fast path) with `</s>`: the crate path, EOS found by name."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": c,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for c, i in [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    rust = _core.Tokenizer.from_file(str(path))
    assert (rust.eos_id, rust.bos_id, rust.vocab_size) == (2, 1, 5)
    py = D.load_tokenizer(str(path), as_data=True)
    texts = ["hello world", "world hello </s> x"]
    assert rust.encode(texts) == _py_ids(py, texts)
    with pytest.raises(SmdmFormatError, match="not in the vocabulary"):
        _core.Tokenizer.from_file(str(path), "<|endoftext|>")


def test_documents_are_text_whatever_the_tokenizer_json_says(trained, tmp_path):
    """prepare's encoder (and `load_tokenizer(as_data=True)`) ignores a tokenizer.json's truncation and
    padding, which used to cut or pad only the documents that take the crate's path (those containing an added
    token's text), and encodes special tokens written in a text as text: `<|endoftext|>` in a document is not
    its end. The oracle is the `tokenizers` package itself, with those settings off by hand."""
    rust, _, path = trained
    spec = json.loads(path.read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 5, "pad_type_id": 0, "pad_token": "x"}
    odd = tmp_path / "tokenizer.json"
    odd.write_text(json.dumps(spec))
    oracle = tokenizers.Tokenizer.from_file(str(path))
    oracle.encode_special_tokens = True
    texts = ["hello world, hello again and again and again " * 3, "a doc <|endoftext|> that goes on " * 3, "hi"]
    want = _py_ids(oracle, texts)
    assert max(map(len, want)) > 32 and min(map(len, want)) < 8
    assert rust.eos_id not in sum(want, [])  # the EOS text in the second document is text
    assert _core.Tokenizer.from_file(str(odd)).encode(texts) == want
    assert _py_ids(D.load_tokenizer(odd, as_data=True), texts) == want
    plain = D.load_tokenizer(odd)  # smdm.load's tokenizer: no truncation or padding, special tokens matched
    assert plain.encode(texts[0], add_special_tokens=False).ids == want[0]
    assert rust.eos_id in plain.encode(texts[1], add_special_tokens=False).ids
    with pytest.raises(SmdmFormatError, match="tokenizer.json: not a readable tokenizer.json"):
        odd.write_text("{")
        D.load_tokenizer(odd)


def test_a_tokenizer_json_the_tokenizers_library_panics_on_is_a_format_error(trained, tmp_path):
    """The `tokenizers` crate panics (instead of returning an error) on some malformed files: a Precompiled
    normalizer whose charsmap does not parse, a BPE continuing_subword_prefix longer than a merge's second
    token. Both loaders name the file with an SmdmFormatError; no PanicException reaches Python."""
    _, _, path = trained
    for name, edit in (("charsmap", lambda s: s.update(normalizer={"type": "Precompiled",
                                                                     "precompiled_charsmap": "AAAA"})),
                       ("prefix", lambda s: s["model"].update(continuing_subword_prefix="####"))):
        spec = json.loads(path.read_text())
        edit(spec)
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(spec))
        with pytest.raises(SmdmFormatError, match=f"{name}.json: tokenizer error: loading failed inside the "
                                                  "tokenizers library"):
            _core.Tokenizer.from_file(str(bad))
        with pytest.raises(SmdmFormatError, match=f"{name}.json: not a readable tokenizer.json"):
            D.load_tokenizer(bad)


def test_bad_tokenizer_files(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(SmdmFormatError, match="tokenizer.json"):
        _core.Tokenizer.from_file(str(p))
    p.write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(SmdmFormatError):
        _core.Tokenizer.from_file(str(p))
    with pytest.raises(SmdmIOError, match="missing.json"):
        _core.Tokenizer.from_file(str(tmp_path / "missing.json"))


def test_too_small_vocab_is_a_value_error(tiny_texts):
    with pytest.raises(ValueError, match="vocab-size"):
        _core.Tokenizer.train_bpe(tiny_texts, 100)


def test_huge_vocab_is_a_value_error_not_an_abort(tmp_path):
    """The BPE trainer reserves memory per requested id: 2^31 ids used to abort the whole process on the
    failed allocation ("memory allocation of 141733920784 bytes failed"). Run in a child process so that
    an abort fails this test instead of killing pytest; the CLI says why and exits 1."""
    import subprocess
    import sys

    code = (
        "from smdm import _core\n"
        "try:\n"
        "    _core.Tokenizer.train_bpe(['ab ab'], 2**31)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "too large" in r.stdout, (r.returncode, r.stdout, r.stderr[-500:])
    (tmp_path / "a.txt").write_text("ab ab ab")
    for v in ("2147483648", "5000000000", "-3"):
        r = subprocess.run(
            [sys.executable, "-m", "smdm.cli", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
             "--vocab-size", v],
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 1 and "vocab-size" in r.stderr and "Traceback" not in r.stderr, (v, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ---- packing ----


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 65535), max_size=30), max_size=20),
    st.sampled_from([300, 65535, 65536, 100_000]),
)
def test_pack_rust_equals_numpy_reference(docs, vocab):
    docs = [[t % vocab for t in d] for d in docs]
    lengths = np.array([len(d) for d in docs], np.uint64)
    flat = np.array([t for d in docs for t in d], np.uint32)
    want = D.pack_documents_numpy(flat, lengths, 0, vocab)
    for tokens in (flat, flat.astype(np.uint16)) if vocab <= 65536 else (flat,):
        got = _core.pack_documents(tokens, lengths, 0, vocab)
        assert got[0].dtype == want[0].dtype == D.shard_dtype(vocab)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    got = D.pack_documents([np.array(d, np.int64) for d in docs], 0, vocab)
    assert np.array_equal(got[0], want[0])


def test_pack_large_parallel_equals_reference():
    g = np.random.default_rng(0)
    lengths = g.integers(0, 2000, 3000).astype(np.uint64)
    flat = g.integers(0, 32000, int(lengths.sum())).astype(np.uint32)
    got = _core.pack_documents(flat, lengths, 7, 32000)
    want = D.pack_documents_numpy(flat, lengths, 7, 32000)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_pack_errors():
    with pytest.raises(ValueError, match="mask id"):
        _core.pack_documents(np.array([1, 300], np.uint32), np.array([2], np.uint64), 0, 300)
    with pytest.raises(ValueError, match="sum to 3"):
        _core.pack_documents(np.array([1, 2], np.uint32), np.array([3], np.uint64), 0, 300)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        _core.pack_documents(np.array([1, 2], np.int64), np.array([2], np.uint64), 0, 300)
    with pytest.raises(ValueError, match="eos_id"):
        _core.pack_documents(np.array([1], np.uint32), np.array([1], np.uint64), 300, 300)


def test_two_tokenizers_do_not_share_cached_pieces(tmp_path, tiny_texts):
    """The fast path's per-thread piece cache belongs to one tokenizer: alternate two, each keeps its ids."""
    paths = []
    for v in (280, 330):
        p = tmp_path / f"tok{v}.json"
        p.write_text(_core.Tokenizer.train_bpe(tiny_texts, v).to_json())
        paths.append(p)
    rust = [_core.Tokenizer.from_file(str(p)) for p in paths]
    py = [D.load_tokenizer(str(p), as_data=True) for p in paths]
    texts = tiny_texts[:20]
    for _ in range(2):
        for r, p in zip(rust, py):
            assert r.encode(texts) == _py_ids(p, texts)
