# python -m pytest benches/bench_pack.py --benchmark-group-by=group --benchmark-columns=min,median,ops
"""Packing throughput (DESIGN §8): the Rust core vs a plain numpy copy of the output bytes (target >= 0.5x),
the numpy reference and a lit-gpt style per-document Python loop (target >= 20x), one group per document
length; all packers are checked equal before timing. `smdm bench pack` prints the same as a table + JSON."""

from __future__ import annotations

import numpy as np
import pytest
from smdm.benchmarks.pack import make_documents, pack_python_loop
from smdm.data import pack_documents_numpy

_core = pytest.importorskip("smdm._core")

VOCAB, EOS, TOKENS = 32000, 0, 4_000_000


@pytest.fixture(scope="module", params=[64, 512, 4096], ids=lambda m: f"mean_doc={m}")
def docs(request):
    flat, lengths = make_documents(TOKENS, request.param, VOCAB)
    want = _core.pack_documents(flat, lengths, EOS, VOCAB)
    return request.param, flat, lengths, want


VARIANTS = {
    "rust": lambda flat, lengths: _core.pack_documents(flat, lengths, EOS, VOCAB),
    "rust_uint16_input": None,  # filled per fixture (needs a uint16 copy of the input)
    "numpy_reference": lambda flat, lengths: pack_documents_numpy(flat, lengths, EOS, VOCAB),
    "python_loop_litgpt": lambda flat, lengths: pack_python_loop(flat, lengths, EOS, VOCAB),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pack(benchmark, docs, name):
    mean, flat, lengths, want = docs
    benchmark.group = f"pack mean_doc={mean}"
    if name == "rust_uint16_input":
        f16 = flat.astype(np.uint16)
        fn = lambda: _core.pack_documents(f16, lengths, EOS, VOCAB)
    else:
        fn = lambda: VARIANTS[name](flat, lengths)
    got = fn()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    if name == "python_loop_litgpt":
        benchmark.pedantic(fn, rounds=3, iterations=1)
    else:
        benchmark(fn)


def test_numpy_copy_same_bytes(benchmark, docs):
    """The baseline: allocate and write the packed stream's bytes once (out = src.copy())."""
    mean, _, _, want = docs
    benchmark.group = f"pack mean_doc={mean}"
    src = want[0].copy()
    assert np.array_equal(benchmark(src.copy), want[0])
