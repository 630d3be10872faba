# python -m pytest -q tests/test_data_reader.py
"""smdm.data.PackedDataset per docs/CONTRACTS.md: window contents and segment ids, a deterministic shuffle
per (seed, epoch), every window served exactly once per epoch across ranks x DataLoader workers (a real
DataLoader with 2 worker processes), O(1) resume equal to the uninterrupted stream, manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from smdm import SmdmFormatError, SmdmIOError
from smdm import data as D

VOCAB, EOS = 500, 0


def make_dataset(root, doc_lengths_per_shard, fmt="smdm", seed=0, vocab=VOCAB):
    """Write shards of random documents (+ EOS) and a manifest; returns the packed streams and starts."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    shards, streams = [], []
    for k, lengths in enumerate(doc_lengths_per_shard):
        lengths = np.asarray(lengths, np.uint64)
        flat = g.integers(1, vocab, int(lengths.sum())).astype(np.uint32)
        stream, starts = D.pack_documents(flat, EOS, vocab, lengths=lengths)
        if fmt == "smdm":
            name = f"shard_{k:05d}.smdm"
            info = D.write_shard(root / name, stream, starts, vocab_size=vocab, eos_id=EOS)
            shards.append(
                dict(
                    file=name,
                    num_tokens=int(stream.size),
                    num_docs=int(starts.size),
                    bytes=info["file_bytes"],
                    crc32=info["file_crc32"],
                )
            )
        else:
            name = f"train_{k:010d}.bin"
            crc = D.write_litpkds(root / name, stream, 8)
            shards.append(
                dict(
                    file=name,
                    num_tokens=int(stream.size),
                    num_docs=int((stream == EOS).sum()),
                    bytes=(root / name).stat().st_size,
                    crc32=crc,
                )
            )
        streams.append((stream, starts))
    dtype = "uint16"
    D.write_manifest(
        root,
        dict(
            version=1,
            format=fmt,
            vocab_size=vocab,
            eos_id=EOS,
            bos_id=None,
            dtype=dtype,
            num_tokens=sum(s["num_tokens"] for s in shards),
            num_docs=sum(s["num_docs"] for s in shards),
            tokenizer=None,
            tokenizer_hash=None,
            shards=shards,
        ),
    )
    return streams


@pytest.fixture
def ds_dir(tmp_path):
    g = np.random.default_rng(1)
    per_shard = [g.integers(0, 60, n) for n in (40, 25, 33)]
    streams = make_dataset(tmp_path / "ds", per_shard)
    return tmp_path / "ds", streams


def _expected_window(streams, seq_len, extra, window_id):
    counts = [max(0, (s.size - extra) // seq_len) for s, _ in streams]
    for (stream, starts), c in zip(streams, counts):
        if window_id < c:
            a = window_id * seq_len
            x = stream[a : a + seq_len + extra].astype(np.int64)
            pos = np.arange(a, a + seq_len + extra)
            seg = np.array([np.sum((starts > a) & (starts <= p)) for p in pos], np.int32)
            return x, seg
        window_id -= c
    raise AssertionError("window id out of range")


@pytest.mark.parametrize("extra", [False, True])
def test_windows_and_segment_ids(ds_dir, extra):
    root, streams = ds_dir
    ds = D.PackedDataset(root, 16, 4, extra_token=extra, seed=3, epochs=1)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    assert ds.manifest.vocab_size == VOCAB and ds.manifest.num_tokens == sum(s.size for s, _ in streams)
    n_windows = sum((s.size - extra) // 16 for s, _ in streams)
    assert ds.num_windows == n_windows and len(ds) == n_windows // 4
    seen = []
    for b in ds:
        assert b["input_ids"].shape == (4, 16 + extra) and b["input_ids"].dtype == torch.int64
        assert b["segment_ids"].dtype == torch.int32 and b["index"].dtype == torch.int64
        for row in range(4):
            x, seg = _expected_window(streams, 16, int(extra), int(b["index"][row]))
            assert np.array_equal(b["input_ids"][row].numpy(), x)
            assert np.array_equal(b["segment_ids"][row].numpy(), seg)
        seen += b["index"].tolist()
    assert len(seen) == len(set(seen)) == len(ds) * 4


def test_shuffle_is_a_deterministic_permutation_per_epoch(ds_dir):
    root, _ = ds_dir
    a = D.PackedDataset(root, 8, 2, seed=5, epochs=2)
    b = D.PackedDataset(root, 8, 2, seed=5, epochs=2)
    ia = [x["index"].tolist() for x in a]
    assert ia == [x["index"].tolist() for x in b]
    e0, e1 = sum(ia[: len(a)], []), sum(ia[len(a) :], [])
    assert e0 != e1 and e0 != sorted(e0)  # shuffled, and differently per epoch
    assert len(set(e0)) == len(e0) and len(set(e1)) == len(e1)
    other = [x["index"].tolist() for x in D.PackedDataset(root, 8, 2, seed=6, epochs=1)]
    assert other != ia[: len(a)]
    plain = [x["index"].tolist() for x in D.PackedDataset(root, 8, 2, shuffle=False, epochs=1)]
    assert sum(plain, []) == list(range(len(a) * 2))


def test_feistel_permutation_is_a_bijection():
    for n in [1, 2, 3, 5, 16, 17, 1000, 4099]:
        p = D.feistel_permute(np.arange(n), n, seed=1, epoch=2)
        assert sorted(p.tolist()) == list(range(n))


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 2), (3, 2), (2, 0)])
def test_every_window_once_per_epoch_across_ranks_and_workers(ds_dir, world_size, workers):
    root, _ = ds_dir
    B = 3
    served = []
    for rank in range(world_size):
        ds = D.PackedDataset(root, 8, B, seed=11, rank=rank, world_size=world_size, epochs=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        batches = list(loader)
        assert len(batches) == len(ds)
        # DataLoader's round-robin over workers restores the rank's batch order
        assert [b["batch"] for b in batches] == list(range(len(ds)))
        served += [i for b in batches for i in b["index"].tolist()]
    n = ds.num_windows
    per_rank = n // (world_size * B) * B
    assert len(served) == len(set(served)) == world_size * per_rank
    # exactly the first world_size * per_rank positions of the epoch's order: the remainder is dropped
    order = D.feistel_permute(np.arange(n), n, 11, 0)
    assert sorted(served) == sorted(order[: world_size * per_rank].tolist())


def test_all_windows_served_when_they_divide_evenly(tmp_path):
    streams = make_dataset(tmp_path / "even", [[7] * 24])  # 24 docs of 7 + EOS = 192 tokens = 24 windows of 8
    assert streams[0][0].size == 192
    served = []
    for rank in range(2):
        ds = D.PackedDataset(tmp_path / "even", 8, 3, rank=rank, world_size=2, epochs=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        served += [i for b in loader for i in b["index"].tolist()]
    assert sorted(served) == list(range(24))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(ds_dir, workers):
    root, _ = ds_dir
    full = D.PackedDataset(root, 8, 2, seed=9)
    it = iter(full)
    want = [next(it) for _ in range(2 * len(full) + 3)]  # crosses two epoch boundaries
    k = len(full) + 1
    first = D.PackedDataset(root, 8, 2, seed=9)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 1}
    assert first.state_after(want[k - 1]) == state
    resumed = D.PackedDataset(root, 8, 2, seed=9)
    resumed.load_state_dict(state)
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=workers)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == len(want) - k:
            break
    for a, b in zip(want[k:], got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["index"], b["index"])
        assert torch.equal(a["segment_ids"], b["segment_ids"])


def test_load_state_dict_rolls_epochs(ds_dir):
    root, _ = ds_dir
    ds = D.PackedDataset(root, 8, 2)
    ds.load_state_dict({"epoch": 0, "batch": len(ds)})
    assert ds.state_dict() == {"epoch": 1, "batch": 0}


def test_resolve_dataset_and_prepared_layout(prepared):
    assert D.resolve_dataset(prepared) == prepared / "train"
    assert D.resolve_dataset(prepared, "val") == prepared / "val"
    assert D.resolve_dataset(prepared / "val") == prepared / "val"
    m = D.load_manifest(prepared / "train")
    assert m.tokenizer_path == (prepared / "tokenizer.json").resolve()
    assert m.tokenizer_hash.startswith("sha256:") and m.bos_id is None and m.vocab_size == 300
    ds = D.PackedDataset(prepared, 32, 2)
    assert ds.root == prepared / "train"
    with pytest.raises(SmdmIOError):
        D.resolve_dataset(prepared / "nope")


def test_litpkds_dataset_segments_follow_eos(tmp_path):
    streams = make_dataset(tmp_path / "lit", [[5, 9, 3, 30], [12, 4]], fmt="litpkds")
    ds = D.PackedDataset(tmp_path / "lit", 8, 1, shuffle=False, epochs=1)
    assert ds.manifest.format == "litpkds"
    for b in ds:
        x, seg = _expected_window(streams, 8, 0, int(b["index"][0]))
        assert np.array_equal(b["input_ids"][0].numpy(), x) and np.array_equal(
            b["segment_ids"][0].numpy(), seg
        )



@pytest.mark.parametrize("fmt", ["smdm", "litpkds"])
def test_documents_of_a_split_in_either_format(tmp_path, fmt):
    """`D.documents`: each document's tokens and its EOS, in shard order; LITPKDS cuts after each EOS and at each
    file's start (a chunk that ends mid-document leaves its rest to the next file as a document of its own)."""
    lengths = [[5, 9, 3, 30], [12, 4]]
    streams = make_dataset(tmp_path / "d", lengths, fmt=fmt)
    docs = list(D.documents(tmp_path / "d", "train"))
    want = [stream[a:a + n + 1] for (stream, starts), ls in zip(streams, lengths) for a, n in zip(starts, ls)]
    assert [d.tolist() for d in docs] == [w.tolist() for w in want] and all(d.dtype == np.int64 for d in docs)
    if fmt == "litpkds":  # a file cut inside a document: its two pieces, the first without an EOS
        stream = streams[0][0]
        (tmp_path / "cut").mkdir()
        D.write_litpkds(tmp_path / "cut" / "a.bin", stream[:7], 8)
        D.write_litpkds(tmp_path / "cut" / "b.bin", stream[7:], 8)
        from smdm.data_cli import import_litpkds

        import_litpkds(tmp_path / "cut", vocab_size=VOCAB, eos_id=EOS, progress=False, log=lambda m: None)
        cut = [d.tolist() for d in D.documents(tmp_path / "cut", "train")]
        assert cut == [stream[:6].tolist(), stream[6:7].tolist(), stream[7:16].tolist()] + [
            d.tolist() for d in want[2:4]]
        # lit-gpt's builder fills a chunk's end with its sep token after the last document: no document
        pad = tmp_path / "pad"
        pad.mkdir()
        D.write_litpkds(pad / "a.bin", np.concatenate([stream[:16], np.full(20, 7, stream.dtype)]), 8)
        import_litpkds(pad, vocab_size=VOCAB, eos_id=EOS, progress=False, log=lambda m: None)
        assert [d.tolist() for d in D.documents(pad, "train")] == [stream[:6].tolist(), stream[6:16].tolist()]


# ---- bad datasets ----


def _edit_manifest(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, exc, words",
    [
        (
            lambda m: m["shards"][1].update(num_tokens=m["shards"][1]["num_tokens"] + 1),
            SmdmFormatError,
            "num_tokens",
        ),
        (lambda m: m.update(vocab_size=700), SmdmFormatError, "vocab_size"),
        (lambda m: m.update(eos_id=3), SmdmFormatError, "eos_id"),
        (lambda m: m.update(vocab_size=2**32), SmdmFormatError, "inconsistent ids: vocab_size 4294967296"),
        (lambda m: m["shards"][0].update(crc32=12345), SmdmFormatError, "CRC"),
        (lambda m: m["shards"][2].update(file="gone.smdm"), SmdmIOError, "gone.smdm"),
        (lambda m: m["shards"][2].update(file="../x.smdm"), SmdmFormatError, "plain file name"),
        (lambda m: m.pop("shards"), SmdmFormatError, "shards"),
        (lambda m: m.update(format="parquet"), SmdmFormatError, "format"),
        (lambda m: m.update(shard_dir="../.."), SmdmFormatError, "shard_dir"),
        (lambda m: m.update(shard_dir="/tmp"), SmdmFormatError, "shard_dir"),
        (lambda m: m.update(shard_dir=".."), SmdmIOError, "listed in .* but missing"),
        # field types: used to escape as TypeError / a ValueError without the file's name, or pass
        (lambda m: m.update(num_docs=None), SmdmFormatError, "manifest.json: field 'num_docs'"),
        (lambda m: m.update(num_docs="7"), SmdmFormatError, "manifest.json: field 'num_docs'"),
        (lambda m: m.update(num_docs=-5), SmdmFormatError, "manifest.json: field 'num_docs'"),
        (lambda m: m.update(bos_id=-1), SmdmFormatError, "manifest.json: field 'bos_id'"),
        (lambda m: m.update(bos_id=True), SmdmFormatError, "manifest.json: field 'bos_id'"),
        (lambda m: m.update(tokenizer=5), SmdmFormatError, "manifest.json: field 'tokenizer'"),
        (lambda m: m.update(tokenizer_hash=["x"]), SmdmFormatError, "manifest.json: field 'tokenizer_hash'"),
    ],
)
def test_manifest_disagreeing_with_files(ds_dir, edit, exc, words):
    root, _ = ds_dir
    _edit_manifest(root, edit)
    with pytest.raises(exc, match=words):
        D.verify_dataset(root)
    with pytest.raises(exc):
        D.PackedDataset(root, 8, 2)


def test_shards_of_different_settings_in_one_dataset(tmp_path):
    root = tmp_path / "mixed"
    make_dataset(root, [[10, 10], [10]])
    s = np.array([1, 2, EOS], np.uint32)
    D.write_shard(root / "shard_00001.smdm", s, np.array([0], np.uint64), vocab_size=900, eos_id=EOS)
    with pytest.raises(SmdmFormatError, match=r"shard_00001.smdm: vocab_size is 900 in the file but 500"):
        D.verify_dataset(root)


def test_corrupt_shard_named_by_verify_and_reader(ds_dir):
    root, _ = ds_dir
    p = root / "shard_00001.smdm"
    raw = bytearray(p.read_bytes())
    raw[100] ^= 0x10
    p.write_bytes(bytes(raw))
    with pytest.raises(SmdmFormatError, match="shard_00001.smdm: payload checksum"):
        D.PackedDataset(root, 8, 2)
    D.PackedDataset(root, 8, 2, verify=False)  # header checks only: opens
    p.write_bytes(bytes(raw[:-5]))
    with pytest.raises(SmdmFormatError, match="shard_00001.smdm: truncated"):
        D.PackedDataset(root, 8, 2, verify=False)


def test_bad_manifest_json_and_small_dataset(tmp_path, ds_dir):
    root, _ = ds_dir
    with pytest.raises(ValueError, match="cannot fill one batch") as e:
        D.PackedDataset(root, 4096, 2)
    assert "never cross" not in str(e.value)  # more than all the tokens: the count says it
    largest = max(s.num_tokens for s in D.load_manifest(root).shards)
    with pytest.raises(ValueError, match=f"windows never cross shard files, the largest holds {largest}"):
        D.PackedDataset(root, largest + 1, 1)  # fewer tokens than all of them, more than any one shard
    (root / "manifest.json").write_text("{oops")
    with pytest.raises(SmdmFormatError, match="manifest.json: not valid JSON"):
        D.load_manifest(root)
    with pytest.raises(SmdmIOError, match="no manifest"):
        D.load_manifest(tmp_path)
