# python -m pytest benches/bench_tokenize.py --benchmark-group-by=group --benchmark-columns=min,median,ops
"""Tokenize + pack throughput (DESIGN §8, target >= 1.5x): smdm's Rust pipeline vs Python `tokenizers`
`encode_batch` + numpy on ~2 MB of the built-in corpus, with the `tokenizers` crate's own encode (the path
smdm's byte-level fast path replaces) as a third row; identical output checked before timing. For scaling
with cores run twice: RAYON_NUM_THREADS=1 RAYON_RS_NUM_THREADS=1 python -m pytest ... and without them."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
from smdm.benchmarks.tokenize import corpus_texts, python_pipeline

_core = pytest.importorskip("smdm._core")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = corpus_texts(2.0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(_core.Tokenizer.train_bpe(corpus_texts(0.5), 4096).to_json())
    rust = _core.Tokenizer.from_file(str(path))
    py = tokenizers.Tokenizer.from_file(str(path))
    return texts, rust, py, rust.encode_pack(texts)


def _check(got, want):
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_rust(benchmark, setup):
    texts, rust, _, want = setup
    benchmark.group = "tokenize+pack"
    _check(benchmark.pedantic(lambda: rust.encode_pack(texts), rounds=3, warmup_rounds=1), want)


def test_rust_crate_encode(benchmark, setup, monkeypatch):
    texts, rust, _, want = setup
    benchmark.group = "tokenize+pack"
    monkeypatch.setenv("SMDM_REFERENCE", "1")
    _check(benchmark.pedantic(lambda: rust.encode_pack(texts), rounds=2, warmup_rounds=1), want)


def test_python_tokenizers_numpy(benchmark, setup):
    texts, rust, py, want = setup
    benchmark.group = "tokenize+pack"
    fn = lambda: python_pipeline(py, texts, rust.eos_id, rust.vocab_size)
    _check(benchmark.pedantic(fn, rounds=2, warmup_rounds=1), want)
