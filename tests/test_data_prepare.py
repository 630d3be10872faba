# python -m pytest -q tests/test_data_prepare.py          (add `-m slow` for the built-in corpus run)
"""`smdm prepare` and `smdm data verify|inspect` end to end on real files: inputs (.txt, .jsonl, .parquet, dirs),
shards equal to tokenizing with Python `tokenizers`, LITPKDS output byte-exact to lit-gpt's builder,
deterministic output, clear errors for bad input, and no half-written output directory."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from smdm import SmdmFormatError, SmdmIOError
from smdm import data as D
from smdm.cli import main as smdm_main
from smdm.corpus import input_bytes, split_of
from smdm.data_cli import import_litpkds, prepare

QUIET = dict(progress=False, log=lambda msg: None)


def _all_tokens(ds_dir):
    m = D.load_manifest(ds_dir)
    if m.format == "smdm":
        return np.concatenate([D.read_shard(s.path)[1] for s in m.shards] or [np.zeros(0, np.uint16)])
    return np.concatenate([D.read_litpkds(s.path)[2] for s in m.shards])


def test_prepared_layout_and_contents(prepared, tiny_jsonl, tiny_texts):
    assert sorted(p.name for p in prepared.iterdir()) == ["tokenizer.json", "train", "val"]
    assert smdm_main(["data", "verify", str(prepared)]) == 0
    py = D.load_tokenizer(str(prepared / "tokenizer.json"), as_data=True)
    eos = py.token_to_id("<|endoftext|>")
    for split in ("train", "val"):
        texts = [t for i, t in enumerate(tiny_texts) if split_of(f"{tiny_jsonl.name}:{i + 1}", 0.1) == split]
        want = np.concatenate(
            [np.array(e.ids + [eos]) for e in py.encode_batch(texts, add_special_tokens=False)]
        )
        got = _all_tokens(prepared / split)
        assert np.array_equal(got, want), split
        m = D.load_manifest(prepared / split)
        assert m.num_docs == len(texts) and m.num_tokens == want.size
        assert all(s.num_tokens <= 4000 for s in m.shards[:-1])  # whole documents, <= --shard-tokens
    assert len(D.load_manifest(prepared / "train").shards) > 1


def test_prepare_is_deterministic_and_reuses_a_tokenizer(prepared, tiny_jsonl, tmp_path):
    out = tmp_path / "again"
    prepare(
        [str(tiny_jsonl)],
        out,
        tokenizer=str(prepared / "tokenizer.json"),
        val_fraction=0.1,
        shard_tokens=4000,
        **QUIET,
    )
    for split in ("train", "val"):
        a = sorted(p.name for p in (prepared / split).iterdir())
        assert a == sorted(p.name for p in (out / split).iterdir())
        for name in a:
            assert (prepared / split / name).read_bytes() == (out / split / name).read_bytes(), name


def test_txt_and_directory_inputs(tmp_path, tiny_texts):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, t in enumerate(tiny_texts[:30]):
        (src / ("sub" if i % 2 else ".") / f"doc{i:02d}.txt").write_text(t)
    (src / "ignored.md").write_text("not an input")
    s = prepare([str(src)], tmp_path / "out", vocab_size=280, val_fraction=0.0, **QUIET)
    assert s["train"]["num_docs"] == 30 and s["val"]["num_docs"] == 0
    assert D.load_manifest(tmp_path / "out" / "val").shards == ()
    assert smdm_main(["data", "verify", str(tmp_path / "out")]) == 0


def lit_gpt_builder(stream_docs, chunk_size, sep_token, dtype, prefix, outdir):
    """lit-gpt's PackedDatasetBuilder (add_array per document, write_reminder at the end), file for file."""
    arr = np.full(chunk_size, sep_token, dtype)
    idx, counter = 0, 0

    def write_chunk():
        nonlocal idx, counter
        with open(outdir / f"{prefix}_{counter:010d}.bin", "wb") as f:
            f.write(b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", chunk_size))
            f.write(arr.tobytes(order="C"))
        counter += 1
        arr.fill(sep_token)
        idx = 0

    for doc in stream_docs:
        while idx + doc.shape[0] > chunk_size:
            part = chunk_size - idx
            arr[idx : idx + part] = doc[:part]
            write_chunk()
            doc = doc[part:]
        arr[idx : idx + doc.shape[0]] = doc
        idx += doc.shape[0]
    if idx:  # write_reminder (smdm skips a chunk that would be padding only)
        write_chunk()


def test_litpkds_output_is_byte_exact_to_lit_gpt(tmp_path, tiny_jsonl, prepared, tiny_texts):
    out = tmp_path / "lit"
    prepare(
        [str(tiny_jsonl)],
        out,
        tokenizer=str(prepared / "tokenizer.json"),
        fmt="litpkds",
        val_fraction=0.1,
        shard_tokens=1500,
        **QUIET,
    )
    assert smdm_main(["data", "verify", str(out)]) == 0
    py = D.load_tokenizer(str(prepared / "tokenizer.json"), as_data=True)
    texts = [t for i, t in enumerate(tiny_texts) if split_of(f"{tiny_jsonl.name}:{i + 1}", 0.1) == "train"]
    docs = [np.array(e.ids + [0], np.uint16) for e in py.encode_batch(texts, add_special_tokens=False)]
    ref = tmp_path / "ref"
    ref.mkdir()
    lit_gpt_builder(docs, 1500, 0, np.uint16, "train", ref)
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in (out / "train").glob("*.bin")) and len(names) > 2
    for n in names:
        assert (ref / n).read_bytes() == (out / "train" / n).read_bytes(), n
    ds = D.PackedDataset(out, 64, 2, epochs=1)
    assert ds.manifest.format == "litpkds" and len(list(ds)) == len(ds)
    # the counts: documents are the documents (not the padding's EOS tokens); the padding is said apart
    m = D.load_manifest(out / "train")
    real = sum(d.size for d in docs)
    assert m.num_docs == len(docs) == sum(s.num_docs for s in m.shards)
    assert [s.padding for s in m.shards] == [0] * (len(m.shards) - 1) + [m.num_tokens - real]
    assert m.shards[-1].padding > 0
    # `smdm data import` of these chunks (no manifest) counts the same documents and padding
    imp = tmp_path / "imported"
    imp.mkdir()
    for n in names:
        (imp / n).write_bytes((out / "train" / n).read_bytes())
    import_litpkds(imp, vocab_size=m.vocab_size, eos_id=0, **QUIET)
    mi = D.load_manifest(imp)
    assert mi.num_docs == m.num_docs and mi.num_tokens == m.num_tokens
    assert [(s.num_docs, s.padding) for s in mi.shards] == [(s.num_docs, s.padding) for s in m.shards]


def test_jsonl_errors_name_file_and_line(tmp_path, prepared):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"txt": "no text field"}\n')
    with pytest.raises(SmdmFormatError, match=r"bad.jsonl:3: no 'text' field"):
        prepare([str(p)], tmp_path / "out", vocab_size=280, **QUIET)
    p.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(SmdmFormatError, match=r"bad.jsonl:2: field 'text' is not a string"):
        prepare([str(p)], tmp_path / "out", vocab_size=280, **QUIET)
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SmdmFormatError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([str(p)], tmp_path / "out", vocab_size=280, **QUIET)
    # JSON that Python's json module refuses other than by JSONDecodeError: named too, no raw traceback
    for n in ("7" * 5000, "[" * 200_000 + "]" * 200_000):
        line = '{"text": "ok", "n": ' + n + "}"
        p.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(SmdmFormatError, match=r"bad.jsonl:2: JSON that Python cannot read"):
            prepare([str(p)], tmp_path / "out", vocab_size=280, **QUIET)
    # valid JSON, but a lone surrogate escape is no text a tokenizer can take (a pair is fine)
    p.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 half"}\n')
    for kw in (dict(vocab_size=280), dict(tokenizer=str(prepared / "tokenizer.json"))):
        with pytest.raises(SmdmFormatError, match=r"bad.jsonl:2: field 'text' holds the lone surrogate"):
            prepare([str(p)], tmp_path / "out", **kw, **QUIET)
    assert not (tmp_path / "out").exists()
    assert [x.name for x in tmp_path.iterdir()] == ["bad.jsonl"]  # no partial output left behind


def test_a_file_name_that_is_not_utf8(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 (Python gives it lone surrogates) is an input like
    any other (it used to fail in the train/val split with "surrogates not allowed", naming no file)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("hello world, hello again " * 20)
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "w") as f:
        f.write("more text here " * 20)
    s = prepare([str(src)], tmp_path / "o", vocab_size=270, val_fraction=0.5, **QUIET)
    assert s["train"]["num_docs"] + s["val"]["num_docs"] == 2


def test_bad_inputs(tmp_path, prepared):
    with pytest.raises(ValueError, match="--shard-tokens must be positive"):  # 0 silently meant the default
        prepare([str(prepared / "tokenizer.json")], tmp_path / "o0", vocab_size=280, shard_tokens=0, **QUIET)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": ""}\n')
    with pytest.raises(SmdmFormatError, match="no documents|no text"):
        prepare([str(empty)], tmp_path / "o1", vocab_size=280, **QUIET)
    with pytest.raises(SmdmFormatError, match="no documents"):
        prepare([str(empty)], tmp_path / "o1", tokenizer=str(prepared / "tokenizer.json"), **QUIET)
    with pytest.raises(SmdmIOError, match="missing.txt"):
        prepare([str(tmp_path / "missing.txt")], tmp_path / "o2", **QUIET)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(SmdmFormatError, match="latin.txt: not UTF-8 at byte offset 3"):
        prepare([str(latin)], tmp_path / "o3", vocab_size=280, **QUIET)
    bad_tok = tmp_path / "tokenizer.json"
    bad_tok.write_text("{}")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(SmdmFormatError, match="tokenizer.json"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "o4", tokenizer=str(bad_tok), **QUIET)
    with pytest.raises(SmdmFormatError, match="unsupported input"):
        prepare([str(tmp_path / "tokenizer.json")], tmp_path / "o5", vocab_size=280, **QUIET)
    with pytest.raises(SmdmIOError, match="not empty"):
        prepare([str(tmp_path / "a.txt")], prepared, vocab_size=280, **QUIET)
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())


def test_out_dot_fills_the_working_directory_and_bad_outputs_are_named(tmp_path, monkeypatch, capsys):
    """`--out .` used to end in `OSError: [Errno 16] Device or resource busy: '.'` (the finished output was
    renamed onto '.'), and an --out below a regular file in a raw FileExistsError traceback."""
    (tmp_path / "a.txt").write_text("hello world, hello again " * 20)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert smdm_main(["prepare", str(tmp_path / "a.txt"), "--out", ".", "--vocab-size", "270"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in here.iterdir()) == ["tokenizer.json", "train", "val"]
    assert D.verify_dataset(here / "train").num_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "here"]  # no temporary left beside it
    # an existing output needs --force, also as '.'; `sub/..` names the directory itself
    (here / "sub").mkdir()
    with pytest.raises(SmdmIOError, match="not empty"):
        prepare([str(tmp_path / "a.txt")], "sub/..", vocab_size=270, **QUIET)
    # outputs that cannot be created: SmdmIOError naming the path, exit 1 without a traceback
    with pytest.raises(SmdmIOError, match="a.txt"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "a.txt" / "out", vocab_size=270, **QUIET)
    assert smdm_main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "a.txt" / "o")]) == 1
    assert "a.txt" in capsys.readouterr().err


def test_force_replaces_only_what_prepare_wrote(tmp_path, monkeypatch):
    """--force swaps the whole --out for the new output, so it must refuse a directory that holds anything
    else (it used to delete the user's inputs and files there, e.g. `--out . --force` in a project)."""
    a = tmp_path / "a.txt"
    a.write_text("hello world, hello again " * 20)
    out = tmp_path / "out"
    prepare([str(a)], out, vocab_size=270, **QUIET)
    first = (out / "tokenizer.json").read_bytes()
    prepare([str(a)], out, vocab_size=280, force=True, **QUIET)  # a previous output: replaced
    assert (out / "tokenizer.json").read_bytes() != first and D.verify_dataset(out / "val").num_tokens >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]  # nothing left beside it

    (out / "notes.md").write_text("mine")  # a file of the user's: refused, nothing touched
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SmdmIOError, match=r"out: --force replaces only .* also holds notes\.md"):
        prepare([str(a)], out, vocab_size=270, force=True, **QUIET)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (out / "notes.md").unlink()
    inner = out / "val" / "more.txt"  # an input inside --out
    inner.write_text("more text " * 30)
    with pytest.raises(SmdmIOError, match=r"more\.txt: an input inside --out"):
        prepare([str(a), str(out)], out, vocab_size=270, force=True, **QUIET)
    assert inner.is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(SmdmIOError, match="a.txt: exists and is not a directory"):
        prepare([str(a)], a, vocab_size=270, force=True, **QUIET)

    # an existing empty --out holds the temporary directory (its parent need not be writable)
    from smdm import data_cli

    seen, publish = [], data_cli._publish
    monkeypatch.setattr(data_cli, "_publish", lambda tmp, o: (seen.append(tmp), publish(tmp, o)))
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare([str(a)], empty, vocab_size=270, **QUIET)
    assert seen[0].parent == empty and sorted(p.name for p in empty.iterdir()) == ["tokenizer.json", "train", "val"]


@pytest.mark.parametrize("fmt", ["smdm", "litpkds"])
def test_eos_text_inside_a_document_is_text(tmp_path, fmt):
    """`<|endoftext|>` written in a document (web pages quote it) is encoded as text, not as the EOS that
    ends a document: it used to split the document in LITPKDS (the manifest said 50 documents, its shards
    100, `documents()` more) while smdm's document table kept it whole."""
    texts = [f"doc {i} quotes <|endoftext|> in the middle, then goes on" for i in range(50)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "o"
    prepare([str(src)], out, vocab_size=300, val_fraction=0.0, fmt=fmt, shard_tokens=4096, **QUIET)
    m = D.load_manifest(out / "train")
    docs = list(D.documents(out, "train"))
    assert m.num_docs == sum(s.num_docs for s in m.shards) == len(docs) == 50
    tok = D.load_tokenizer(out / "tokenizer.json", as_data=True)
    assert sorted(d[:-1].tolist() for d in docs) == sorted(tok.encode(t, add_special_tokens=False).ids for t in texts)


def test_log_names_the_vocabulary_actually_trained(tmp_path):
    """BPE training stops when the sample has no more pairs to merge: the log said "300 ids" for the ~260 trained."""
    (tmp_path / "a.txt").write_text("ab ab ab")
    logs = []
    s = prepare([str(tmp_path / "a.txt")], tmp_path / "o", vocab_size=300, progress=False, log=logs.append)
    assert s["vocab_size"] < 300
    assert f"BPE ({s['vocab_size']} ids (of 300 asked" in logs[0], logs


def _parquet(path, columns: dict, row_group_size=None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_gives_the_same_tokens_as_jsonl(tmp_path, prepared, tiny_texts):
    """Several row groups, a non-default column (--text-field), an extra column, string / large_string /
    dictionary-encoded columns, an empty string (skipped like in jsonl) and a 0-row file: the shards equal
    those of the same texts in one jsonl (files are read in name order)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = tiny_texts[:70] + [""] + tiny_texts[70:]
    src = tmp_path / "pq"
    src.mkdir()
    _parquet(src / "a.parquet", {"id": list(range(50)), "content": texts[:50]}, row_group_size=7)
    _parquet(src / "b.parquet", {"content": pa.array(texts[50:], pa.large_string())}, row_group_size=11)
    _parquet(src / "c.parquet", {"content": pa.array(texts[:3] * 2).dictionary_encode()})  # pandas category
    _parquet(src / "d_empty.parquet", {"content": pa.array([], pa.string())})
    assert pq.ParquetFile(src / "a.parquet").num_row_groups == 8
    assert pa.types.is_dictionary(pq.ParquetFile(src / "c.parquet").schema_arrow.field("content").type)
    all_texts = texts + texts[:3] * 2
    # the progress bar / BPE sample size count the text, not the (smaller) compressed files
    text_bytes = sum(len(t.encode()) for t in all_texts)
    assert text_bytes <= input_bytes([str(src)], "content") < 1.5 * text_bytes  # + offsets, page headers
    jl = tmp_path / "same.jsonl"
    jl.write_text("".join(json.dumps({"content": t}) + "\n" for t in all_texts))
    tok = str(prepared / "tokenizer.json")
    opts = dict(tokenizer=tok, val_fraction=0.0, shard_tokens=3000, text_field="content", **QUIET)
    a = prepare([str(src)], tmp_path / "from_pq", **opts)
    b = prepare([str(jl)], tmp_path / "from_jsonl", **opts)
    assert a["train"]["num_docs"] == b["train"]["num_docs"] == len(tiny_texts) + 6
    got, want = _all_tokens(tmp_path / "from_pq" / "train"), _all_tokens(tmp_path / "from_jsonl" / "train")
    assert got.size > 10_000 and np.array_equal(got, want)
    py = D.load_tokenizer(tok, as_data=True)
    eos = D.load_manifest(tmp_path / "from_pq" / "train").eos_id
    ref = [e.ids + [eos] for e in py.encode_batch(tiny_texts + tiny_texts[:3] * 2, add_special_tokens=False)]
    assert np.array_equal(got, np.concatenate([np.array(r) for r in ref]))
    # the CLI flag reaches the reader
    argv = ["prepare", str(src / "b.parquet"), "--out", str(tmp_path / "cli"), "--tokenizer", tok]
    assert smdm_main(argv + ["--text-field", "content", "--val-fraction", "0"]) == 0
    assert D.load_manifest(tmp_path / "cli" / "train").num_docs == len(texts) - 50 - 1  # "" skipped


@pytest.mark.parametrize(
    "columns, words",
    [
        ({"text": ["ok", None, "also ok"]}, r"bad.parquet: row 1 \(0-based\): column 'text' is null"),
        ({"text": [1, 2]}, r"bad.parquet: column 'text' has type int64, expected strings"),
        ({"text": [b"bytes"]}, r"bad.parquet: column 'text' has type binary"),
        ({"body": ["x"], "id": [3]}, r"bad.parquet: no 'text' column \(columns: 'body', 'id'\)"),
    ],
)
def test_parquet_errors_name_file_and_column(tmp_path, prepared, columns, words):
    bad = _parquet(tmp_path / "bad.parquet", columns, row_group_size=2)
    tok = str(prepared / "tokenizer.json")
    with pytest.raises(SmdmFormatError, match=words):
        prepare([str(bad)], tmp_path / "out", tokenizer=tok, **QUIET)
    with pytest.raises(SmdmFormatError, match=words):  # the tokenizer-training pass reads it first
        prepare([str(bad)], tmp_path / "out", vocab_size=280, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]  # nothing half-written


def test_parquet_null_in_a_later_row_group_is_named_by_its_row(tmp_path, prepared):
    bad = _parquet(tmp_path / "late.parquet", {"text": ["a"] * 9 + [None] + ["b"]}, row_group_size=4)
    with pytest.raises(SmdmFormatError, match=r"late.parquet: row 9 \(0-based\)"):
        prepare([str(bad)], tmp_path / "out", tokenizer=str(prepared / "tokenizer.json"), **QUIET)


def test_empty_and_corrupt_parquet_files(tmp_path, prepared):
    tok = str(prepared / "tokenizer.json")
    zero = tmp_path / "zero.parquet"
    zero.write_bytes(b"")
    with pytest.raises(SmdmFormatError, match="zero.parquet: not a readable parquet file"):
        prepare([str(zero)], tmp_path / "out", tokenizer=tok, **QUIET)
    notpq = tmp_path / "text.parquet"
    notpq.write_text("just some text, not parquet\n")
    with pytest.raises(SmdmFormatError, match="text.parquet: not a readable parquet file"):
        prepare([str(notpq)], tmp_path / "out", tokenizer=tok, **QUIET)
    pa = pytest.importorskip("pyarrow")
    empty = _parquet(tmp_path / "rows0.parquet", {"text": pa.array([], pa.string())})
    with pytest.raises(SmdmFormatError, match="no documents"):
        prepare([str(empty)], tmp_path / "out", tokenizer=tok, **QUIET)
    assert not (tmp_path / "out").exists()


def test_pyarrow_is_imported_lazily_and_its_absence_is_a_clear_error(tmp_path):
    """`import smdm` (and text-only prepare) never loads pyarrow; without it a .parquet input fails
    up front, naming the file and the fix. pyarrow is hidden from a child interpreter, not mocked."""
    import subprocess
    import sys

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    code = f"""
import sys
import smdm, smdm.data, smdm.data_cli, smdm.corpus, smdm.cli
assert "pyarrow" not in sys.modules, "pyarrow imported by import smdm"
sys.modules["pyarrow"] = None  # as if not installed
from smdm.data_cli import import_litpkds, prepare
try:
    prepare([{str(tmp_path / "a.parquet")!r}], {str(tmp_path / "out")!r}, vocab_size=280, progress=False)
except smdm.SmdmFormatError as e:
    print("ERR", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "a.parquet" in r.stdout and "pip install pyarrow" in r.stdout
    assert not (tmp_path / "out").exists()


def test_cli_prepare_verify_inspect(tmp_path, tiny_jsonl, capsys):
    out = tmp_path / "cli"
    assert (
        smdm_main(
            [
                "prepare",
                str(tiny_jsonl),
                "--out",
                str(out),
                "--vocab-size",
                "280",
                "--val-fraction",
                "0.2",
                "--shard-tokens",
                "3000",
            ]
        )
        == 0
    )
    assert "train:" in capsys.readouterr().out
    assert smdm_main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uint16" in text and "vocab_size 280" in text and "sample" in text and "def f" in text
    # 0 shows none; a negative count is a usage error (-5 printed all but the last 5 tokens as the "sample")
    assert smdm_main(["data", "inspect", str(out), "--sample-tokens", "0", "--max-shards", "0"]) == 0
    assert "sample" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        smdm_main(["data", "inspect", str(out), "--sample-tokens", "-5"])
    assert e.value.code == 2 and "--sample-tokens: must be >= 0, got -5" in capsys.readouterr().err
    assert smdm_main(["prepare", "--out", str(out), str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt" in capsys.readouterr().err
    # corrupt one shard: verify fails naming it
    shard = sorted((out / "train").glob("*.smdm"))[1]
    raw = bytearray(shard.read_bytes())
    (out / "val" / "manifest.json").rename(tmp_path / "val-manifest.json")  # a split without its manifest
    for cmd in ("verify", "inspect"):  # verify printed "train: OK" and passed, the val shards unseen
        assert smdm_main(["data", cmd, str(out)]) == 1
        assert f"{out}/val: holds 2 files but no manifest.json" in capsys.readouterr().err
    (tmp_path / "val-manifest.json").rename(out / "val" / "manifest.json")
    raw[80] ^= 1
    shard.write_bytes(bytes(raw))
    assert smdm_main(["data", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "checksum" in err
    # a tokenizer that changed after prepare
    tok = out / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|endoftext|>"', 1) + " ")
    assert smdm_main(["data", "verify", str(out / "val")]) == 1
    assert "hash" in capsys.readouterr().err


def test_cli_prepare_notes_an_empty_val_split_and_inspect_survives_a_closed_pipe(tmp_path, tiny_jsonl, capsys):
    import subprocess
    import sys

    out = tmp_path / "noval"
    assert smdm_main(["prepare", str(tiny_jsonl), "--out", str(out), "--vocab-size", "280",
                      "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{out}/val is empty" in err and "--val-every 0" in err
    # `smdm data inspect DIR | head -1`: no BrokenPipeError traceback when the reader has left (unbuffered, so
    # the first print inside the command meets the closed pipe)
    code = "import sys; from smdm.cli import main; sys.exit(main())"
    p = subprocess.Popen([sys.executable, "-u", "-c", code, "data", "inspect", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait() == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_cli_prepare_notes_a_litpkds_split_that_is_mostly_padding(tmp_path, tiny_jsonl, prepared, capsys):
    """A corpus smaller than one LITPKDS chunk (lit-gpt's 2049 x 1024 tokens by default) comes out as that much
    EOS padding, which the reader serves like text: prepare (and train, from the manifest) say so."""
    from smdm.data_cli import padding_note

    tok = str(prepared / "tokenizer.json")
    out = tmp_path / "big-chunk"
    assert smdm_main(["prepare", str(tiny_jsonl), "--out", str(out), "--tokenizer", tok, "--format", "litpkds"]) == 0
    err = capsys.readouterr().err
    m = D.load_manifest(out / "train")
    pad = sum(s.padding for s in m.shards)
    assert m.num_tokens == 2049 * 1024 and pad > m.num_tokens / 2
    assert f"of {out}/train ({pad:,} of {m.num_tokens:,} tokens) is EOS padding" in err
    assert f"{out}/val (" in err and "--shard-tokens" in err
    out = tmp_path / "small-chunk"
    assert smdm_main(["prepare", str(tiny_jsonl), "--out", str(out), "--tokenizer", tok, "--format", "litpkds",
                      "--shard-tokens", "600"]) == 0
    assert f"of {out}/train (" not in capsys.readouterr().err  # (its small val split is still mostly padding)
    assert padding_note("d", 100, 50) is None and "51%" in padding_note("d", 100, 51)
    assert padding_note("d", 0, 0) is None


def test_inspect_with_an_unreadable_tokenizer_fails_naming_it(tmp_path, prepared, capsys):
    """`smdm data inspect` decodes a sample with the dataset's tokenizer.json: a corrupt one used to escape
    as the `tokenizers` package's bare Exception (a traceback) instead of an error naming the file."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    (out / "tokenizer.json").write_text('{"broken')
    assert smdm_main(["data", "inspect", str(out / "train")]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json: not a readable tokenizer.json" in err


def test_manifest_is_valid_json_with_the_contract_fields(prepared):
    m = json.loads((prepared / "train" / "manifest.json").read_text())
    for k in ("format", "vocab_size", "eos_id", "bos_id", "dtype", "num_tokens", "tokenizer_hash", "shards"):
        assert k in m
    assert {"file", "num_tokens", "num_docs", "bytes", "crc32"} <= set(m["shards"][0])


@pytest.mark.slow
def test_builtin_corpus(tmp_path):
    """The built-in corpus (stdlib .py files, ~30 MB): ~1-2 min on 2 cores, mostly BPE training."""
    s = prepare([], tmp_path / "std", **QUIET)
    assert s["vocab_size"] == 8192 and s["train"]["num_tokens"] > 1_000_000 and s["val"]["num_docs"] > 0
    assert smdm_main(["data", "verify", str(tmp_path / "std")]) == 0
    py = D.load_tokenizer(str(tmp_path / "std" / "tokenizer.json"), as_data=True)
    val = _all_tokens(tmp_path / "std" / "val")
    text = py.decode(val[:2000].tolist(), skip_special_tokens=False)
    assert "<|endoftext|>" in text or len(text) > 1000
