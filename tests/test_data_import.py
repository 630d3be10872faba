# python -m pytest -q tests/test_data_import.py
"""`smdm data import`: a lit-gpt / TinyLlama directory of LITPKDS chunks without a manifest becomes a dataset.

Chunks are built in the test the way lit-gpt's PackedDatasetBuilder lays them out (documents `ids + [EOS]`
back to back, split across chunks, the last chunk padded with the BOS sep token), written with smdm's
LITPKDS writer; bad files are hand-written bytes. The reader's windows are compared with the tokens read
straight from the files with numpy, and the user's files must be byte-for-byte untouched."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from smdm import SmdmFormatError, SmdmIOError
from smdm import data as D
from smdm.cli import main as smdm_main
from smdm.data_cli import import_litpkds

BOS, EOS = 1, 2  # the Llama tokenizer's ids, as in SMDM's data
QUIET = dict(progress=False, log=lambda msg: None)


def lit_gpt_chunks(root, prefix, n_docs, chunk_size, vocab, code, seed=0):
    """lit-gpt's builder: docs `ids + [EOS]` concatenated, cut into chunk_size files, the tail of the last
    one filled with the sep token (BOS); written with smdm's LITPKDS writer. Returns the paths."""
    g = np.random.default_rng(seed)
    docs = [np.append(g.integers(3, vocab, g.integers(1, 120)), EOS) for _ in range(n_docs)]
    stream = np.concatenate(docs)
    pad = -stream.size % chunk_size
    stream = np.concatenate([stream, np.full(pad, BOS, stream.dtype)])
    paths = []
    for k in range(stream.size // chunk_size):
        p = root / f"{prefix}_{k:010d}.bin"
        D.write_litpkds(p, stream[k * chunk_size : (k + 1) * chunk_size], code)
        paths.append(p)
    return paths


def file_tokens(path) -> np.ndarray:
    """Tokens of a LITPKDS file, read with plain numpy (independent of smdm's readers)."""
    raw = path.read_bytes()
    dt = {8: "<u2", 4: "<i4"}[raw[15]]
    (n,) = struct.unpack("<Q", raw[16:24])
    return np.frombuffer(raw, dt, n, 24).astype(np.int64)


def snapshot(root):
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("vocab, code", [(32000, 8), (70000, 4)])  # lit-gpt's dtype="auto": uint16 / int32
def test_import_then_windows_equal_the_file_tokens(tmp_path, vocab, code, capsys):
    root = tmp_path / "slim"
    root.mkdir()
    # several builders (processes) as in TinyLlama's prepare script: train_slimpajama_{process}_{counter}
    files = []
    for proc in (0, 2, 10):
        files += lit_gpt_chunks(root, f"train_slimpajama_{proc}", 25, 700, vocab, code, seed=proc)
    other = lit_gpt_chunks(root, "validation_slimpajama_0", 5, 700, vocab, code, seed=99)
    (root / "README.txt").write_text("not a chunk")
    before = snapshot(root)

    s = import_litpkds(root, vocab_size=vocab, eos_id=EOS, prefix="train", **QUIET)
    after = snapshot(root)
    assert after.pop(D.Path("manifest.json"))[0]  # the only new file
    assert after == before  # nothing the user had changed (bytes and mtimes)
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temporary left

    m = D.load_manifest(root)
    assert [sh.path.name for sh in m.shards] == [p.name for p in files]  # natural order: _2_ before _10_
    assert all(sh.path.name not in {p.name for p in other} for sh in m.shards)
    toks = [file_tokens(p) for p in files]
    assert m.format == "litpkds" and m.dtype == {8: "uint16", 4: "int32"}[code]
    assert m.num_tokens == s["num_tokens"] == sum(t.size for t in toks)
    assert m.num_docs == s["num_docs"] == 75 == sum(int((t == EOS).sum()) for t in toks)
    assert smdm_main(["data", "verify", str(root)]) == 0

    L = 64
    ds = D.PackedDataset(root, L, 4, extra_token=True, epochs=1)
    ds.MAX_OPEN_SHARDS = 2  # shuffled windows over more files than maps kept open: the LRU reopens them
    per_file = [(t.size - 1) // L for t in toks]
    assert ds.num_windows == sum(per_file)
    first = np.cumsum([0] + per_file)
    seen = 0
    for b in ds:
        for w, x, seg in zip(b["index"].tolist(), b["input_ids"].numpy(), b["segment_ids"].numpy()):
            f = int(np.searchsorted(first, w, side="right") - 1)
            a = (w - first[f]) * L
            want = toks[f][a : a + L + 1]
            assert np.array_equal(x, want), (files[f].name, a)
            # a new document starts right after each EOS inside the window
            assert np.array_equal(seg, np.concatenate([[0], np.cumsum(want[:-1] == EOS)])), (files[f].name, a)
            seen += 1
    assert seen == len(ds) * 4 and len(ds) == ds.num_windows // 4
    assert len(ds._maps) == 2
    ds._maps = None  # least recently used first out: a file used again stays open, the older one goes
    for i in (0, 1, 0, 2):
        ds._shard(i)
    assert list(ds._maps) == [0, 2]
    capsys.readouterr()  # an import without --tokenizer: inspect says so (it printed "tokenizer None (None)")
    assert smdm_main(["data", "inspect", str(root)]) == 0
    assert "tokenizer: none recorded" in capsys.readouterr().out


def test_split_layout_feeds_smdm_train(tmp_path, capsys):
    """TinyLlama's layout (train_* and validation_* side by side) imported as two splits; `smdm train --data
    DIR` trains on train/ and validates on val/, reading the chunk files in DIR."""
    root = tmp_path / "lit"
    root.mkdir()
    lit_gpt_chunks(root, "train_slimpajama_0", 60, 500, 128, 8)
    lit_gpt_chunks(root, "validation_slimpajama_0", 10, 500, 128, 8, seed=5)
    base = ["data", "import", str(root), "--vocab-size", "128", "--eos-id", str(EOS)]
    assert smdm_main(base + ["--prefix", "train", "--split", "train"]) == 0
    assert smdm_main(base + ["--prefix", "validation", "--split", "val"]) == 0
    assert "train/manifest.json" in capsys.readouterr().out
    assert json.loads((root / "train" / "manifest.json").read_text())["shard_dir"] == ".."
    assert D.resolve_dataset(root) == root / "train" and D.resolve_dataset(root, "val") == root / "val"
    assert {s.path.parent for s in D.load_manifest(root / "val").shards} == {root.resolve()}
    assert smdm_main(["data", "verify", str(root)]) == 0
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = smdm_main(["train", "--config", "tiny", "--data", str(root), "--out", str(tmp_path / "run"),
                        "--max-steps", "2", "--batch-size", "4", "--seq-len", "32", "--val-every", "2",
                        "--val-batches", "1", "--val-samples", "2", "--save-every", "0", "--samples", "0"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "val" for r in rows) and any("loss" in r for r in rows)


def _header(magic=b"LITPKDS", version=1, code=8, chunk=4):
    return magic + struct.pack("<Q", version) + bytes([code]) + struct.pack("<Q", chunk)


@pytest.mark.parametrize(
    "raw, words",
    [
        (_header(magic=b"LITPKDX") + b"\0" * 8, r"train_0000000001.bin: bad magic at offset 0"),
        (_header(version=2) + b"\0" * 8, r"train_0000000001.bin: unsupported LITPKDS version 2 at offset 7"),
        (_header(code=9) + b"\0" * 8, r"train_0000000001.bin: bad dtype code 9 at offset 15"),
        (_header(code=6) + b"\0" * 16, r"train_0000000001.bin: dtype code 6 \(offset 15\) is a float type"),
        (_header()[:10], r"train_0000000001.bin: truncated: 10 bytes, shorter than the 24-byte LITPKDS header"),
        (_header() + b"\0" * 7, r"train_0000000001.bin: truncated: 31 bytes, but chunk_size 4 \(offset 16\)"),
        (_header() + b"\0" * 9, r"train_0000000001.bin: trailing bytes: 33 bytes"),
        (_header() + np.array([5, 2, 500, 7], "<u2").tobytes(),
         r"train_0000000001.bin: token id 500 at token 2 \(byte offset 28\) >= vocab_size 300"),
        (_header() + np.array([5, 300, 2, 7], "<u2").tobytes(),
         r"train_0000000001.bin: token id 300 at token 1 \(byte offset 26\) equals the mask id"),
        (_header(code=4) + np.array([5, 2, -3, 7], "<i4").tobytes(),
         r"train_0000000001.bin: token id -3 at token 2 \(byte offset 32\) is not a valid id"),
    ],
)
def test_bad_files_are_named_with_the_offset_and_nothing_is_written(tmp_path, capsys, raw, words):
    root = tmp_path / "d"
    root.mkdir()
    D.write_litpkds(root / "train_0000000000.bin", [5, 6, EOS, 7], 8)
    (root / "train_0000000001.bin").write_bytes(raw)
    before = snapshot(root)
    with pytest.raises(SmdmFormatError, match=words):
        import_litpkds(root, vocab_size=300, eos_id=EOS, **QUIET)
    assert snapshot(root) == before  # no manifest, no temporary, the files untouched
    assert smdm_main(["data", "import", str(root), "--vocab-size", "300", "--eos-id", "2"]) == 1
    err = capsys.readouterr().err
    assert "smdm data import: error:" in err and "train_0000000001.bin" in err
    assert snapshot(root) == before


def test_files_of_different_dtypes_are_refused(tmp_path):
    D.write_litpkds(tmp_path / "c_0000000000.bin", [5, EOS], 8)
    D.write_litpkds(tmp_path / "c_0000000001.bin", [5, EOS], 4)
    with pytest.raises(SmdmFormatError, match=r"c_0000000001.bin: dtype int32, but c_0000000000.bin holds uint16"):
        import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, **QUIET)
    assert not (tmp_path / "manifest.json").exists()


def test_existing_manifest_needs_force_and_is_replaced_atomically(tmp_path):
    lit_gpt_chunks(tmp_path, "train", 8, 100, 300, 8)
    import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, **QUIET)
    old = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(SmdmIOError, match="manifest.json: exists .*--force"):
        import_litpkds(tmp_path, vocab_size=300, eos_id=7, **QUIET)
    assert (tmp_path / "manifest.json").read_bytes() == old
    import_litpkds(tmp_path, vocab_size=300, eos_id=BOS, force=True, **QUIET)
    m = D.load_manifest(tmp_path)
    # BOS occurs only as the last chunk's padding: its run ends one "document", the rest is padding
    bos = sum(int((file_tokens(s.path) == BOS).sum()) for s in m.shards)
    assert m.eos_id == BOS and m.num_docs == 1 and [s.padding for s in m.shards][-1] == bos - 1 > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".bin")) == ["manifest.json"]


def test_only_the_last_file_ends_in_padding(tmp_path):
    """Empty documents (a lone EOS each) at the end of a middle file are documents; the same run ending the
    split's last file is one document's end plus padding (how `smdm prepare --format litpkds` fills it)."""
    chunks = [[5, 6, EOS, EOS, EOS], [7, EOS, 8, 9, 10], [11, EOS, EOS, EOS, EOS]]
    for k, c in enumerate(chunks):
        D.write_litpkds(tmp_path / f"train_{k:010d}.bin", np.array(c, np.uint16), 8)
    import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, **QUIET)
    m = D.load_manifest(tmp_path)
    assert [(s.num_docs, s.padding) for s in m.shards] == [(3, 0), (1, 0), (1, 3)]
    assert m.num_docs == 5 and m.num_tokens == 15


def test_usage_errors(tmp_path):
    lit_gpt_chunks(tmp_path, "train", 4, 100, 300, 8)
    with pytest.raises(SmdmIOError, match="no such directory"):
        import_litpkds(tmp_path / "nope", vocab_size=300, eos_id=EOS, **QUIET)
    with pytest.raises(SmdmFormatError, match=r"no valid\*.bin files"):
        import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, prefix="valid", **QUIET)
    with pytest.raises(ValueError, match="--eos-id"):
        import_litpkds(tmp_path, vocab_size=300, **QUIET)
    with pytest.raises(ValueError, match="--vocab-size"):
        import_litpkds(tmp_path, eos_id=EOS, **QUIET)
    with pytest.raises(ValueError, match="--eos-id 300 < --vocab-size 300"):
        import_litpkds(tmp_path, vocab_size=300, eos_id=300, **QUIET)
    with pytest.raises(ValueError, match="--split"):
        import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, split="../x", **QUIET)
    assert {p.suffix for p in tmp_path.iterdir()} == {".bin"}  # nothing written


def test_tokenizer_is_recorded_and_checked(tmp_path, prepared, capsys):
    """--tokenizer gives vocab_size/eos_id, is recorded by relative path + hash: `verify` checks it, `inspect`
    decodes a sample, a changed tokenizer fails verification."""
    tok = prepared / "tokenizer.json"
    data = tmp_path / "data"
    data.mkdir()
    # tokens of real text: the prepared val split, re-chunked lit-gpt style
    stream = np.concatenate([D.read_shard(s.path)[1] for s in D.load_manifest(prepared / "val").shards])
    for k in range(0, stream.size, 400):
        D.write_litpkds(data / f"val_{k // 400:010d}.bin", stream[k : k + 400], 8)
    own_tok = tmp_path / "tok" / "tokenizer.json"
    own_tok.parent.mkdir()
    own_tok.write_bytes(tok.read_bytes())
    assert smdm_main(["data", "import", str(data), "--tokenizer", str(own_tok), "--split", "val"]) == 0
    raw = json.loads((data / "val" / "manifest.json").read_text())
    assert raw["tokenizer"] == "../../tok/tokenizer.json" and raw["vocab_size"] == 300 and raw["eos_id"] == 0
    assert D.load_manifest(data / "val").tokenizer_path == own_tok.resolve()
    assert smdm_main(["data", "inspect", str(data)]) == 0
    assert "def f" in capsys.readouterr().out
    assert smdm_main(["data", "verify", str(data)]) == 0
    with pytest.raises(ValueError, match="differs from the tokenizer's EOS id 0"):
        import_litpkds(data, tokenizer=str(own_tok), eos_id=5, split="val", force=True, **QUIET)
    own_tok.write_text(own_tok.read_text() + " ")
    assert smdm_main(["data", "verify", str(data)]) == 1
    assert "hash" in capsys.readouterr().err


def test_a_chunk_changed_after_import_is_caught_by_the_reader(tmp_path):
    files = lit_gpt_chunks(tmp_path, "train", 30, 300, 300, 8)
    import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, **QUIET)
    raw = bytearray(files[1].read_bytes())
    raw[40] ^= 1
    files[1].write_bytes(bytes(raw))
    with pytest.raises(SmdmFormatError, match=f"{files[1].name}: file CRC-32"):
        D.PackedDataset(tmp_path, 16, 2)
    os.truncate(files[1], len(raw) - 2)
    with pytest.raises(SmdmFormatError, match=f"{files[1].name}: truncated"):
        D.PackedDataset(tmp_path, 16, 2, verify=False)


def test_notes_for_a_shadowing_manifest_and_an_eos_that_never_occurs(tmp_path):
    lit_gpt_chunks(tmp_path, "train", 6, 200, 300, 8)
    notes = []
    import_litpkds(tmp_path, vocab_size=300, eos_id=EOS, split="train", progress=False, log=notes.append)
    assert notes == []
    import_litpkds(tmp_path, vocab_size=400, eos_id=350, progress=False, log=notes.append)  # ids are < 300
    assert any("--data" in n and "train/manifest.json" in n for n in notes)  # DIR/manifest.json wins
    assert any("no token equals eos_id 350" in n for n in notes)
    assert D.resolve_dataset(tmp_path) == tmp_path and D.load_manifest(tmp_path).num_docs == 0
