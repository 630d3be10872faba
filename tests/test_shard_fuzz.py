# python -m pytest -q tests/test_shard_fuzz.py
"""Property tests: random bytes and mutated valid files fed to the Rust readers (smdm shard + LITPKDS) and to
the numpy references. Never a PanicException or a crash, only SmdmFormatError / SmdmIOError; and whenever a
reader accepts a file, it returns exactly what the reference reads (no silent short read)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from smdm import SmdmFormatError, SmdmIOError, _core
from smdm import data as D

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ALLOWED = (SmdmFormatError, SmdmIOError)


def _valid_shard(tmp_path, vocab, docs):
    lengths = np.array([len(d) for d in docs], np.uint64)
    flat = np.array([t % vocab for d in docs for t in d], np.uint32)
    stream, starts = D.pack_documents_numpy(flat, lengths, 0, vocab)
    p = tmp_path / "valid.smdm"
    D.write_shard_numpy(p, stream, starts, vocab, 0, None)
    return p.read_bytes()


def _outcome(fn):
    """('ok', value) or ('err', exception class); anything else (PanicException, ...) fails the test."""
    try:
        return "ok", fn()
    except ALLOWED as e:
        assert str(e), "empty error message"
        return "err", type(e)
    except BaseException as e:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"{type(e).__module__}.{type(e).__name__} escaped: {e}")


def _check_shard_bytes(path, raw):
    path.write_bytes(raw)
    rust = _outcome(lambda: _core.shard_read(str(path)))
    ref = _outcome(lambda: D.read_shard_numpy(path))
    info = _outcome(lambda: _core.shard_info(str(path), verify=False))
    assert rust[0] == ref[0], (rust, ref)
    if rust[0] == "ok":
        (h, toks, starts), (h2, toks2, starts2) = rust[1], ref[1]
        assert h == h2 and np.array_equal(toks, toks2) and np.array_equal(starts, starts2)
        assert toks.size == h["num_tokens"] and starts.size == h["num_docs"]
        assert info[0] == "ok"
    # a file that passes the full check also passes the header-only one
    if info[0] == "err":
        assert rust[0] == "err"


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_smdm(tmp_path, raw):
    _check_shard_bytes(tmp_path / "r.smdm", raw)


@SETTINGS
@given(
    st.sampled_from([50, 300, 70000]),
    st.lists(st.lists(st.integers(0, 2**20), max_size=12), min_size=1, max_size=5),
    st.data(),
)
def test_mutated_valid_shards(tmp_path, vocab, docs, data):
    raw = bytearray(_valid_shard(tmp_path, vocab, docs))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i : i + 8] = data.draw(st.binary(min_size=8, max_size=8))
    assume(bytes(raw) != _valid_shard(tmp_path, vocab, docs))
    _check_shard_bytes(tmp_path / "m.smdm", bytes(raw))
    # any single change to a checksummed file is caught (CRC-32 detects all 1..3-bit errors here)
    if kind in ("flip", "truncate", "extend"):
        with pytest.raises(ALLOWED):
            _core.shard_read(str(tmp_path / "m.smdm"))


def _check_litpkds_bytes(path, raw):
    path.write_bytes(raw)
    rust = _outcome(lambda: _core.litpkds_read(str(path)))
    ref = _outcome(lambda: D.read_litpkds_numpy(path))
    toks = _outcome(lambda: _core.litpkds_tokens(str(path), 1000))
    assert rust[0] == ref[0], (rust, ref)
    if rust[0] == "ok":
        (c, n, arr), (c2, n2, arr2) = rust[1], ref[1]
        assert (c, n) == (c2, n2) and arr.dtype == arr2.dtype and arr.size == n
        assert np.array_equal(arr, arr2, equal_nan=arr.dtype.kind == "f")
        if toks[0] == "ok":
            assert np.array_equal(toks[1], arr) and toks[1].size == n
    else:
        assert toks[0] == "err"


@SETTINGS
@given(st.binary(max_size=120))
def test_random_bytes_litpkds(tmp_path, raw):
    _check_litpkds_bytes(tmp_path / "r.bin", raw)


@SETTINGS
@given(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]),
    st.lists(st.integers(0, 127), max_size=20),
    st.data(),
)
def test_mutated_litpkds(tmp_path, code, toks, data):
    raw = bytearray(D.encode_litpkds_numpy(np.array(toks, np.int64), code))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "header"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, 23))
        raw[i] = data.draw(st.integers(0, 255))
    _check_litpkds_bytes(tmp_path / "m.bin", bytes(raw))


@SETTINGS
@given(st.binary(max_size=200))
def test_random_manifest_bytes(tmp_path, raw):
    (tmp_path / "manifest.json").write_bytes(raw)
    _outcome(lambda: D.load_manifest(tmp_path))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(st.data())
def test_manifest_fields_of_any_json_type(tmp_path, data):
    """A valid manifest with one field (top level or of a shard entry) set to any JSON value, or removed:
    loading and verifying it raise only SmdmFormatError / SmdmIOError (never TypeError, KeyError, ...)."""
    import json

    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    stream, starts = D.pack_documents([[1, 2, 3], [4, 5]], 0, 50)
    info = D.write_shard(ds / "s.smdm", stream, starts, vocab_size=50, eos_id=0)
    m = dict(
        version=1, format="smdm", vocab_size=50, eos_id=0, bos_id=None, dtype="uint16", num_tokens=7,
        num_docs=2, tokenizer=None, tokenizer_hash=None,
        shards=[dict(file="s.smdm", num_tokens=7, num_docs=2, bytes=info["file_bytes"], crc32=info["file_crc32"])],
    )
    target = m if data.draw(st.booleans()) else m["shards"][0]
    key = data.draw(st.sampled_from(sorted(target) + ["shard_dir"]))
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = data.draw(JSON_VALUES)
    (ds / "manifest.json").write_text(json.dumps(m))
    _outcome(lambda: D.verify_dataset(ds))
