# python -m pytest -q tests/test_data_format.py
"""The smdm shard format v1 and LITPKDS: the Rust writer/reader and the numpy reference produce and accept
identical bytes, and every kind of bad file raises SmdmFormatError / SmdmIOError naming file and offset."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from smdm import SmdmFormatError, SmdmIOError, _core
from smdm import data as D


def _sample(vocab=300, n_docs=7, seed=0):
    g = np.random.default_rng(seed)
    lengths = g.integers(0, 40, n_docs).astype(np.uint64)
    flat = g.integers(1, vocab, int(lengths.sum())).astype(np.uint32)
    return D.pack_documents_numpy(flat, lengths, 0, vocab)


@pytest.mark.parametrize("vocab", [300, 65535, 65536, 70000])
@pytest.mark.parametrize("bos", [None, 1])
def test_rust_and_numpy_write_identical_bytes(tmp_path, vocab, bos):
    stream, starts = _sample(vocab)
    a = D.write_shard(tmp_path / "rust.smdm", stream, starts, vocab_size=vocab, eos_id=0, bos_id=bos)
    b = D.write_shard_numpy(tmp_path / "np.smdm", stream, starts, vocab, 0, bos)
    raw = (tmp_path / "rust.smdm").read_bytes()
    assert raw == (tmp_path / "np.smdm").read_bytes()
    assert a == b
    assert len(raw) % 8 == 0 and raw[:8] == b"SMDMSHRD"
    assert a["dtype"] == ("uint16" if vocab < 65536 else "uint32")
    assert a["file_crc32"] == zlib.crc32(raw)
    # both readers read both files
    for reader in (D.read_shard_numpy, lambda p: _core.shard_read(str(p))):
        h, toks, st = reader(tmp_path / "np.smdm")
        assert np.array_equal(toks, stream) and np.array_equal(st, starts)
        assert h["bos_id"] == bos and h["vocab_size"] == vocab and h["num_docs"] == starts.size


def test_header_layout_is_the_documented_one(tmp_path):
    stream, starts = _sample()
    D.write_shard(tmp_path / "a.smdm", stream, starts, vocab_size=300, eos_id=0, bos_id=None)
    raw = (tmp_path / "a.smdm").read_bytes()
    magic, version, itemsize, n_tok, n_doc, vocab, eos, bos, crc = struct.unpack_from("<8sIIQQIIII", raw)
    assert (magic, version, itemsize, n_tok, n_doc) == (b"SMDMSHRD", 1, 2, stream.size, starts.size)
    assert (vocab, eos, bos) == (300, 0, 0xFFFFFFFF)
    assert raw[48:60] == bytes(12)
    assert struct.unpack_from("<I", raw, 60)[0] == zlib.crc32(raw[:60])
    assert crc == zlib.crc32(raw[64:])
    table = 64 + (stream.size * 2 + 7) // 8 * 8
    assert np.array_equal(np.frombuffer(raw, "<u8", offset=table), starts)
    assert len(raw) == table + 8 * starts.size


def test_empty_shard_roundtrips(tmp_path):
    D.write_shard(
        tmp_path / "e.smdm", np.zeros(0, np.uint16), np.zeros(0, np.uint64), vocab_size=10, eos_id=0
    )
    h, toks, starts = D.read_shard(tmp_path / "e.smdm")
    assert h["num_tokens"] == 0 and toks.size == 0 and starts.size == 0


def test_writer_rejects_bad_ids_and_starts_and_leaves_nothing(tmp_path, monkeypatch):
    stream, starts = _sample()
    bad = stream.copy()
    bad[5] = 300  # == vocab_size == the mask id
    with pytest.raises(ValueError, match="mask id"):
        D.write_shard(tmp_path / "x.smdm", bad, starts, vocab_size=300, eos_id=0)
    bad[5] = 301
    with pytest.raises(ValueError, match="301"):
        D.write_shard(tmp_path / "x.smdm", bad, starts, vocab_size=300, eos_id=0)
    with pytest.raises(ValueError, match="document start"):
        D.write_shard(tmp_path / "x.smdm", stream, starts[::-1].copy(), vocab_size=300, eos_id=0)
    with pytest.raises(ValueError):
        D.write_shard(tmp_path / "x.smdm", stream, starts, vocab_size=300, eos_id=300)
    # float ids were truncated silently (1.7 -> 1) by both writers and the packers
    floats = stream.astype(np.float64) + 0.7
    for ref in ("0", "1"):  # the Rust path and the numpy reference
        monkeypatch.setenv("SMDM_REFERENCE", ref)
        with pytest.raises(ValueError, match="integers, got an array of dtype float64"):
            D.write_shard(tmp_path / "x.smdm", floats, starts, vocab_size=300, eos_id=0)
        with pytest.raises(ValueError, match="integers"):
            D.write_litpkds(tmp_path / "x.bin", floats, 8)
        with pytest.raises(ValueError, match="integers"):
            D.pack_documents([floats[:3], [1, 2]], 0, 300)
        with pytest.raises(ValueError, match="integers"):
            D.pack_documents(floats, 0, 300, lengths=[floats.size])
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)|>= vocab_size"):
            D.pack_documents([np.array([1, -2]), []], 0, 300)  # checked, never wrapped
        assert D.pack_documents([[1, 2], []], 0, 300)[0].tolist() == [1, 2, 0, 0]
    assert list(tmp_path.iterdir()) == []  # no shard, no temp file


def _good(tmp_path, vocab=300):
    stream, starts = _sample(vocab)
    p = tmp_path / "s.smdm"
    D.write_shard(p, stream, starts, vocab_size=vocab, eos_id=0, bos_id=1)
    return p, p.read_bytes()


def _both_readers(p):
    """Run the Rust and the numpy reader; both must raise the same class; return the messages."""
    msgs = []
    for read in (lambda: _core.shard_read(str(p)), lambda: D.read_shard_numpy(p)):
        with pytest.raises((SmdmFormatError, SmdmIOError)) as e:
            read()
        msgs.append(str(e.value))
    return msgs


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda b: b"XMDMSHRD" + b[8:], "magic"),
        (lambda b: b[:30], "truncated"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\0" * 8, "trailing"),
        (lambda b: b[:70] + bytes([b[70] ^ 4]) + b[71:], "checksum"),  # payload bit flip
        (lambda b: b[:17] + bytes([b[17] ^ 1]) + b[18:], "checksum"),  # header bit flip (token count)
        (lambda b: b"", "truncated"),
    ],
)
def test_bad_shards_raise_naming_file(tmp_path, mutate, words):
    p, raw = _good(tmp_path)
    p.write_bytes(mutate(raw))
    for msg in _both_readers(p):
        assert str(p) in msg and words in msg, msg


def _rewrite_header(raw: bytes, **fields) -> bytes:
    """Change header fields and fix both CRCs, so only the semantic check can catch it."""
    h = bytearray(raw[:64])
    offsets = {"version": (8, "<I"), "dtype": (12, "<I"), "vocab": (32, "<I"), "eos": (36, "<I")}
    for k, v in fields.items():
        off, fmt = offsets[k]
        struct.pack_into(fmt, h, off, v)
    struct.pack_into("<I", h, 60, zlib.crc32(bytes(h[:60])))
    return bytes(h) + raw[64:]


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(version=2), "version 2"),
        (dict(dtype=3), "dtype 3"),
        (dict(dtype=4), "dtype"),  # itemsize 4 with a 300-id vocabulary: size and dtype disagree
        (dict(vocab=20), "mask id"),  # ids >= 20 in the payload; token 20 is the mask id, or larger
        (dict(eos=400), "eos_id"),
    ],
)
def test_semantic_header_errors(tmp_path, fields, words):
    p, raw = _good(tmp_path)
    p.write_bytes(_rewrite_header(raw, **fields))
    msgs = _both_readers(p)
    assert str(p) in msgs[0]
    if words != "mask id":
        assert words in msgs[0], msgs[0]
    else:
        assert "vocab_size 20" in msgs[0] and "byte offset" in msgs[0], msgs[0]


def test_token_equal_to_mask_id_in_file(tmp_path):
    stream, starts = _sample()
    p = tmp_path / "m.smdm"
    D.write_shard(p, stream, starts, vocab_size=300, eos_id=0)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<H", raw, 64 + 2 * 3, 300)  # token 3 := mask id
    payload_crc = zlib.crc32(bytes(raw[64:]))
    struct.pack_into("<I", raw, 44, payload_crc)
    struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[:60])))
    p.write_bytes(bytes(raw))
    for msg in _both_readers(p):
        assert "mask id" in msg and "token 3" in msg and "byte offset 70" in msg, msg
    # header-only open still works (cheap checks), the full check fails
    assert _core.shard_info(str(p), verify=False)["num_tokens"] == stream.size


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(SmdmIOError, match="missing.smdm"):
        _core.shard_info(str(tmp_path / "missing.smdm"))
    with pytest.raises(SmdmIOError):
        _core.shard_read(str(tmp_path))  # a directory
    with pytest.raises(SmdmIOError):
        _core.litpkds_read(str(tmp_path / "missing.bin"))


# ---- LITPKDS ----


def lit_gpt_chunk_bytes(arr: np.ndarray, code: int) -> bytes:
    """lit-gpt `PackedDatasetBuilder._write_chunk` (packed_dataset.py), reproduced byte for byte."""
    out = b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", arr.size)
    return out + arr.tobytes(order="C")


@pytest.mark.parametrize(
    "code, dtype", [(1, np.uint8), (2, np.int8), (3, np.int16), (4, np.int32), (5, np.int64), (8, np.uint16)]
)
def test_litpkds_write_is_byte_exact(tmp_path, code, dtype):
    toks = np.arange(0, 100, 3, dtype=np.uint32)
    crc = D.write_litpkds(tmp_path / "r.bin", toks, code)
    D.write_litpkds_numpy(tmp_path / "n.bin", toks, code)
    want = lit_gpt_chunk_bytes(toks.astype(dtype), code)
    assert (tmp_path / "r.bin").read_bytes() == want == (tmp_path / "n.bin").read_bytes()
    assert crc == zlib.crc32(want)
    c, chunk, arr = D.read_litpkds(tmp_path / "r.bin")
    assert (c, chunk) == (code, toks.size) and arr.dtype == np.dtype(dtype) and np.array_equal(arr, toks)
    assert np.array_equal(_core.litpkds_tokens(str(tmp_path / "r.bin"), 100), toks)


@pytest.mark.parametrize("code, dtype", [(6, np.float32), (7, np.float64)])
def test_litpkds_float_files_read_but_are_not_tokens(tmp_path, code, dtype):
    (tmp_path / "f.bin").write_bytes(lit_gpt_chunk_bytes(np.arange(5, dtype=dtype), code))
    c, chunk, arr = _core.litpkds_read(str(tmp_path / "f.bin"))
    assert c == code and arr.dtype == np.dtype(dtype) and np.array_equal(arr, np.arange(5))
    with pytest.raises(SmdmFormatError, match="float"):
        _core.litpkds_tokens(str(tmp_path / "f.bin"))


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda b: b"LITPKDX" + b[7:], "magic"),
        (lambda b: b[:7] + struct.pack("<Q", 2) + b[15:], "version"),
        (lambda b: b[:15] + b"\x09" + b[16:], "dtype"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b + b"\0\0", "trailing"),
        (lambda b: b[:16] + struct.pack("<Q", 2**62) + b[24:], "chunk_size"),  # impossible size
    ],
)
def test_bad_litpkds_files(tmp_path, mutate, words):
    p = tmp_path / "x.bin"
    p.write_bytes(mutate(lit_gpt_chunk_bytes(np.arange(8, dtype=np.uint16), 8)))
    for read in (lambda: _core.litpkds_read(str(p)), lambda: D.read_litpkds_numpy(p)):
        with pytest.raises(SmdmFormatError) as e:
            read()
        assert str(p) in str(e.value)
    with pytest.raises(SmdmFormatError, match=words):
        _core.litpkds_read(str(p))


def test_litpkds_negative_and_out_of_vocab_ids(tmp_path):
    p = tmp_path / "neg.bin"
    p.write_bytes(lit_gpt_chunk_bytes(np.array([1, -2, 3], np.int32), 4))
    with pytest.raises(SmdmFormatError, match="token 1"):
        _core.litpkds_tokens(str(p))
    p.write_bytes(lit_gpt_chunk_bytes(np.array([1, 2, 50], np.int32), 4))
    with pytest.raises(SmdmFormatError, match="mask id"):
        _core.litpkds_tokens(str(p), 50)


def test_a_shard_larger_than_memory_is_a_memory_error(tmp_path):
    """Reading a shard needs memory for its tokens: a (sparse) 8 TiB shard with a valid header is a
    MemoryError naming the file; it used to abort the whole process (`memory allocation ... failed`).
    uint16 shards are read as uint16 (no uint32 copy in between)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("overcommit_memory=1: the allocation would succeed and the read touch every page")
    n = 2**42
    head = b"SMDMSHRD" + struct.pack("<IIQQ", 1, 2, n, 1) + struct.pack("<IIII", 10, 0, 0xFFFFFFFF, 0) + b"\0" * 12
    path = tmp_path / "huge.smdm"
    with open(path, "wb") as f:
        f.write(head + struct.pack("<I", zlib.crc32(head)))
        try:
            f.truncate(64 + 2 * n + 8)
        except OSError as e:
            pytest.skip(f"this filesystem holds no sparse 8 TiB file: {e}")
    with pytest.raises(MemoryError, match="huge.smdm"):
        _core.shard_read(str(path), verify=False)
    small = tmp_path / "small.smdm"
    _core.shard_write(str(small), np.arange(5, dtype=np.uint32), np.array([0], np.uint64), 10, 0)
    assert _core.shard_read(str(small))[1].dtype == np.uint16


def test_concurrent_atomic_writes_of_one_path_publish_whole_files(tmp_path):
    """Threads writing one path each use their own temporary name (`smdm.data.temp_path`): a shared name let
    one writer truncate another's file before its rename (cut files published, renames of a vanished file)."""
    import threading

    path = tmp_path / "x.json"
    errors, seen = [], []

    def write(t):
        try:
            for _ in range(10):
                D.write_atomic(path, bytes([t]) * (1 << 18))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def read():
        for _ in range(300):
            if path.exists():
                seen.append(path.read_bytes())

    threads = [threading.Thread(target=write, args=(t,)) for t in range(6)] + [threading.Thread(target=read)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(len(b) == 1 << 18 and b == b[:1] * len(b) for b in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
