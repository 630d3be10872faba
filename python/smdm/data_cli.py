"""`smdm prepare` (text -> tokenizer -> shards), `smdm data verify|inspect`, and `smdm data import` (a
manifest for a lit-gpt / TinyLlama directory of LITPKDS chunks, e.g. SMDM's released data; IMPORT_HELP).

    smdm prepare [INPUT ...] --out DIR [--tokenizer tokenizer.json | --vocab-size N]
                 [--format smdm|litpkds] [--val-fraction F] [--shard-tokens N] [--text-field NAME]
    smdm data verify|inspect DIR
    smdm data import DIR --vocab-size N --eos-id E [--prefix P] [--split S] [--tokenizer T] [--force]

INPUT: .txt (one document per file), .jsonl (one per line, field "text"), .parquet (one per row of the
column "text", a string column without nulls; needs pyarrow), or directories of those; --text-field picks
another jsonl field / parquet column. No INPUT: the built-in corpus (the Python standard library's `.py`
files).

Pipeline: documents are read in Python in chunks of ~4 MB of text, split train/val by a stable hash of
their key (`smdm.corpus.split_of`), and each chunk is encoded and packed (`ids + [EOS]`) in Rust across
all cores with the GIL released (`smdm._core.Tokenizer.encode_pack`); a tqdm bar follows the input bytes.
Shards (smdm: whole documents, at most --shard-tokens tokens unless one document is longer; litpkds:
exactly --shard-tokens tokens, the last padded with EOS like lit-gpt) are written into a temporary
directory next to DIR, each split's manifest.json last, then the directory is renamed to DIR: an
interrupted run never leaves a half-written DIR. (An existing empty DIR, e.g. `--out .`, is filled in
place instead: tokenizer.json, then each split directory whole, its manifest inside.)

Without --tokenizer a byte-level BPE tokenizer of --vocab-size ids (default 8192) is trained in Rust on a
stable hash-chosen sample of the training documents of about --tokenizer-sample-mb MB (default 8: BPE
training time grows with the sample, and 8 MB of stdlib code already gives stable merges for 8k ids).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from smdm import corpus
from smdm.data import (
    LITPKDS_DTYPES,
    MANIFEST,
    MANIFEST_VERSION,
    decode_sample,
    find_litpkds_files,
    fsync_dir,
    litpkds_dtype_code,
    litpkds_shard_entry,
    load_manifest,
    sha256_file,
    shard_dtype,
    split_without_manifest,
    verify_dataset,
    write_atomic,
    write_litpkds,
    write_manifest,
    write_shard,
)
from smdm.errors import SmdmFormatError, SmdmIOError

DEFAULT_VOCAB = 8192
DEFAULT_SHARD_TOKENS = {"smdm": 1 << 24, "litpkds": 2049 * 1024}  # litpkds: TinyLlama's chunk size
CHUNK_CHARS = 4 << 20  # text per Rust call: big enough to keep all cores busy, small enough for the bar
SPLITS = ("train", "val")


class _Sink:
    """Accumulates packed chunks of one split and writes shards of the chosen format."""

    def __init__(self, root: Path, fmt: str, shard_tokens: int, vocab: int, eos: int, bos: Optional[int]):
        self.root, self.fmt, self.shard_tokens = root, fmt, shard_tokens
        self.vocab, self.eos, self.bos = vocab, eos, bos
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.n = 0
        self.shards: list[dict] = []
        self.num_docs = 0

    def add(self, stream: np.ndarray, starts: np.ndarray) -> None:
        if stream.size == 0:
            return
        self.parts.append((stream, starts))
        self.n += stream.size
        self.num_docs += starts.size
        while self.n >= self.shard_tokens:
            self._flush(final=False)

    def _joined(self) -> tuple[np.ndarray, np.ndarray]:
        offs = np.cumsum([0] + [s.size for s, _ in self.parts[:-1]], dtype=np.uint64)
        stream = np.concatenate([s for s, _ in self.parts])
        starts = np.concatenate([st + o for (_, st), o in zip(self.parts, offs)])
        return stream, starts

    def _flush(self, final: bool) -> None:
        stream, starts = self._joined()
        n = stream.size
        if self.fmt == "litpkds":
            cut = min(n, self.shard_tokens)
        else:  # whole documents: the last document boundary <= shard_tokens (or the first document)
            bounds = np.append(starts, n)
            ok = bounds[(bounds > 0) & (bounds <= self.shard_tokens)]
            cut = int(ok.max()) if ok.size else int(bounds[1])
        self._write(stream[:cut], starts[starts < cut])
        rest, rest_starts = stream[cut:], starts[starts >= cut] - np.uint64(cut)
        self.parts = [(rest, rest_starts)] if rest.size else []
        self.n = rest.size

    def finish(self) -> None:
        while self.n:
            self._flush(final=True)

    def _write(self, stream: np.ndarray, starts: np.ndarray) -> None:
        k = len(self.shards)
        if self.fmt == "smdm":
            name = f"shard_{k:05d}.smdm"
            info = write_shard(
                self.root / name, stream, starts, vocab_size=self.vocab, eos_id=self.eos, bos_id=self.bos
            )
            entry = dict(file=name, num_tokens=stream.size, num_docs=starts.size)
            entry.update(bytes=info["file_bytes"], crc32=info["file_crc32"])
        else:
            name = f"{self.root.name}_{k:010d}.bin"  # lit-gpt's `{prefix}_{counter:010d}.bin`
            docs = int((stream == self.eos).sum())  # the documents' EOS tokens, not the padding's
            pad = self.shard_tokens - stream.size
            if pad:  # lit-gpt pads the last chunk with its separator token
                stream = np.concatenate([stream, np.full(pad, self.eos, stream.dtype)])
            code = litpkds_dtype_code(self.vocab)
            crc = write_litpkds(self.root / name, stream, code)
            size = (self.root / name).stat().st_size
            entry = dict(file=name, num_tokens=int(stream.size), num_docs=docs)
            if pad:  # counted in num_tokens (the reader reads them, as lit-gpt's does), said apart
                entry["padding"] = pad
            entry.update(bytes=size, crc32=crc)
        self.shards.append(entry)

    def manifest(self, tokenizer_hash: str) -> dict:
        if self.fmt == "smdm":
            dtype = shard_dtype(self.vocab).name
        else:
            dtype = np.dtype(LITPKDS_DTYPES[litpkds_dtype_code(self.vocab)]).name
        return dict(
            version=MANIFEST_VERSION,
            format=self.fmt,
            vocab_size=self.vocab,
            eos_id=self.eos,
            bos_id=self.bos,
            dtype=dtype,
            num_tokens=sum(s["num_tokens"] for s in self.shards),
            num_docs=self.num_docs,
            tokenizer="../tokenizer.json",
            tokenizer_hash=tokenizer_hash,
            shards=self.shards,
        )


def _train_tokenizer(
    inputs: Sequence[str], vocab_size: int, val_fraction: float, sample_mb: float, log, text_field: str
):
    from smdm._core import Tokenizer

    total = max(1, corpus.input_bytes(inputs, text_field))
    q = min(1.0, sample_mb * 1e6 / total)
    sample = [
        d.text
        for d in corpus.input_docs(inputs, text_field)
        if d.text
        and corpus.split_of(d.key, val_fraction) == "train"
        and corpus.split_of(d.key + "#bpe", q) == "val"
    ]
    if not sample:
        raise SmdmFormatError(f"no text to train a tokenizer on in {list(inputs) or 'the built-in corpus'}")
    t0 = time.perf_counter()
    tok = Tokenizer.train_bpe(sample, vocab_size)
    mb = sum(len(s) for s in sample) / 1e6
    fewer = "" if tok.vocab_size == vocab_size else f" (of {vocab_size} asked: the sample has no more merges)"
    log(
        f"trained byte-level BPE ({tok.vocab_size} ids{fewer}) on {len(sample)} documents, {mb:.1f} MB, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return tok


def prepare(
    inputs: Sequence[str],
    out: os.PathLike | str,
    *,
    tokenizer: Optional[str] = None,
    vocab_size: Optional[int] = None,
    fmt: str = "smdm",
    val_fraction: float = 0.02,
    shard_tokens: Optional[int] = None,
    eos_token: Optional[str] = None,
    tokenizer_sample_mb: float = 8.0,
    text_field: str = "text",
    force: bool = False,
    progress: Optional[bool] = None,
    log=None,
) -> dict:
    """Tokenize `inputs` (or the built-in corpus) into OUT/{train,val}/ + OUT/tokenizer.json.
    Returns a summary dict (tokens/documents per split, seconds)."""
    from tqdm import tqdm

    from smdm._core import Tokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if fmt not in DEFAULT_SHARD_TOKENS:
        raise ValueError(f"--format must be 'smdm' or 'litpkds', got {fmt!r}")
    if tokenizer is not None and vocab_size is not None:
        raise ValueError("give either --tokenizer or --vocab-size, not both")
    if vocab_size is not None and not 0 < vocab_size < 2**32:
        raise ValueError(f"--vocab-size must be a positive number of ids below 2**32, got {vocab_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    shard_tokens = int(DEFAULT_SHARD_TOKENS[fmt] if shard_tokens is None else shard_tokens)  # 0 is an error
    if shard_tokens < 1:
        raise ValueError("--shard-tokens must be positive")
    files = corpus.expand_inputs(inputs)  # fail early on missing or unsupported inputs
    out = Path(os.path.abspath(out))  # `--out .` / `x/..`: a real name, so the temporary dir can sit beside it
    _check_out(out, force, [f for f, _ in files])
    t0 = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmdmIOError(f"{out.parent}: cannot create the output's parent directory: {e.strerror or e}") from e
    # An existing empty --out (often `.`) is filled from a temporary directory inside it, so its parent need
    # not be writable; otherwise the temporary directory sits beside --out and is renamed onto it.
    inside = out.is_dir() and not any(out.iterdir())
    tmp = out / f".partial-{os.getpid()}" if inside else out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for s in SPLITS:
            (tmp / s).mkdir(parents=True)
        if tokenizer is not None:
            tok = Tokenizer.from_file(tokenizer, eos_token)
            write_atomic(tmp / "tokenizer.json", Path(tokenizer).read_bytes())  # fsynced like the shards
        else:
            tok = _train_tokenizer(
                inputs, vocab_size or DEFAULT_VOCAB, val_fraction, tokenizer_sample_mb, log, text_field
            )
            write_atomic(tmp / "tokenizer.json", tok.to_json().encode())
        tok_hash = sha256_file(tmp / "tokenizer.json")
        sinks = {s: _Sink(tmp / s, fmt, shard_tokens, tok.vocab_size, tok.eos_id, tok.bos_id) for s in SPLITS}
        total = corpus.input_bytes(inputs, text_field)
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=True if progress is False else None,
        )
        pending = {s: [] for s in SPLITS}
        size = 0
        n_docs = 0

        def flush():
            for s, texts in pending.items():
                if texts:
                    sinks[s].add(*tok.encode_pack(texts))
                    texts.clear()

        for doc in corpus.input_docs(inputs, text_field):
            nbytes = len(doc.text.encode("utf-8", "surrogatepass"))
            bar.update(nbytes)
            if not doc.text:
                continue
            n_docs += 1
            pending[corpus.split_of(doc.key, val_fraction)].append(doc.text)
            size += len(doc.text)
            if size >= CHUNK_CHARS:
                flush()
                size = 0
        flush()
        bar.close()
        if n_docs == 0:
            raise SmdmFormatError(f"no documents: {list(inputs) or 'the built-in corpus'} holds no text")
        summary = {}
        for s, sink in sinks.items():
            sink.finish()
            m = sink.manifest(tok_hash)
            write_manifest(tmp / s, m)  # last file of the split
            summary[s] = dict(num_tokens=m["num_tokens"], num_docs=m["num_docs"], shards=len(m["shards"]),
                              padding=sum(e.get("padding", 0) for e in m["shards"]))
        _publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, SmdmIOError):  # the output side: name the path
            raise SmdmIOError(f"{e.filename or out}: {e.strerror or e}") from e
        raise
    summary.update(vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id, format=fmt)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


_OUTPUTS = ("tokenizer.json", *SPLITS)  # what `smdm prepare` writes into --out


def _check_out(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse an --out that prepare must not replace: a non-empty one without --force, and with --force one
    that holds anything but a previous prepare's output (tokenizer.json, train/, val/, a killed run's
    .partial-* directory) or any input file: --force swaps the whole directory for the new output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SmdmIOError(f"{out}: exists and is not a directory")
    names = sorted(e.name for e in out.iterdir())
    if not names:
        return
    if not force:
        raise SmdmIOError(f"{out}: exists and is not empty (use --force to replace it)")
    foreign = [n for n in names if n not in _OUTPUTS and not n.startswith(".partial-")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SmdmIOError(f"{out}: --force replaces only a directory that `smdm prepare` wrote "
                          f"({', '.join(_OUTPUTS)}), but it also holds {shown}; choose another --out")
    real = out.resolve()
    for f in inputs:
        if real in f.resolve().parents:
            raise SmdmIOError(f"{f}: an input inside --out {out}, which --force would replace")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished output directory `tmp` to `out`. An existing empty `out` (often the working
    directory: `--out .`, which cannot be renamed) holds `tmp` and is filled from it in place: the
    tokenizer first, then each split directory whole, its manifest inside. A non-empty `out` (--force, after
    `_check_out`) is swapped for `tmp` (put back if the swap fails); no `out` is a plain rename."""
    if tmp.parent == out:
        for name in _OUTPUTS:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    elif out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out)
    fsync_dir(out.parent)


IMPORT_HELP = """\
Write a manifest for a directory of lit-gpt / TinyLlama LITPKDS chunk files (e.g. SMDM's released
SlimPajama data) so that `smdm train --data DIR` and smdm.data.PackedDataset read them in place.
The .bin files are only read: never modified, moved or renamed. The manifest is written atomically
(temporary file, fsync, rename), so a reader sees no manifest or a complete one.

Files: DIR/PREFIX*.bin (not recursive, hidden files skipped) in natural order (..._2_... before
..._10_...). Every file is checked in full: magic, version 1, an integer dtype code (the same in every
file), the exact length its chunk_size implies, and every token id < --vocab-size (the MDM mask id is
vocab_size); an error names the file and the byte offset.

Documents: lit-gpt's PackedDatasetBuilder (TinyLlama's and SMDM's prepare scripts) stores each document
as `ids + [EOS]` (its tokenizer adds EOS, not BOS), back to back, splitting a document across chunk
files when it does not fit, and fills the unused tail of a builder's last chunk with its sep token (BOS,
id 1 for the Llama tokenizer). smdm starts a document after each --eos-id token and at the start of each
file: a document split across two files is two segments, and a padding tail after the last EOS is a
segment of its own. A run of EOS tokens ending the last file (`smdm prepare --format litpkds` pads its last
chunk with EOS) counts as one document's end plus padding; elsewhere each EOS ends a document. Windows
never cross files (as in lit-gpt). SMDM itself trained without document masking: `smdm train --no-doc-mask`
does the same.

Layout: without --split the manifest is DIR/manifest.json (DIR becomes a dataset directory). TinyLlama
writes train_* and validation_* chunks side by side; import each into its split (DIR/S/manifest.json,
pointing at the files in DIR) and train on DIR:
    smdm data import DIR --prefix train_slim --split train --vocab-size 32000 --eos-id 2
    smdm data import DIR --prefix validation --split val --vocab-size 32000 --eos-id 2
    smdm train --data DIR ...
"""


def import_litpkds(
    src: os.PathLike | str,
    *,
    vocab_size: Optional[int] = None,
    eos_id: Optional[int] = None,
    prefix: str = "",
    split: Optional[str] = None,
    tokenizer: Optional[str] = None,
    eos_token: Optional[str] = None,
    force: bool = False,
    progress: Optional[bool] = None,
    log=None,
) -> dict:
    """Check every `{prefix}*.bin` LITPKDS file in `src` and write a manifest for them (see IMPORT_HELP):
    `src/manifest.json`, or `src/{split}/manifest.json` with `shard_dir` "..". Returns a summary dict."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    src = Path(src)
    if not src.is_dir():
        raise SmdmIOError(f"{src}: no such directory")
    bos_id = tok_rel = tok_hash = None
    if split is not None and (Path(split).name != split or split in ("", ".", "..")):
        raise ValueError(f"--split must be a plain directory name such as train or val, got {split!r}")
    out = src / split if split else src
    if tokenizer is not None:
        from smdm._core import Tokenizer

        tok = Tokenizer.from_file(tokenizer, eos_token)
        if vocab_size is not None and vocab_size < tok.vocab_size:
            raise ValueError(f"--vocab-size {vocab_size} < the tokenizer's {tok.vocab_size} ids")
        if eos_id is not None and eos_id != tok.eos_id:
            raise ValueError(f"--eos-id {eos_id} differs from the tokenizer's EOS id {tok.eos_id}")
        vocab_size = tok.vocab_size if vocab_size is None else vocab_size
        eos_id, bos_id = tok.eos_id, tok.bos_id
        tok_rel = os.path.relpath(Path(tokenizer).resolve(), out.resolve())
        tok_hash = sha256_file(tokenizer)
    if vocab_size is None:
        raise ValueError("give --vocab-size (the tokenizer's number of ids; 32000 for SMDM's Llama data)")
    if eos_id is None:
        raise ValueError("give --eos-id (the id that ends each document; 2 for SMDM's Llama data)")
    if not 0 < vocab_size < 2**32 or not 0 <= eos_id < vocab_size:
        raise ValueError(f"need 0 <= --eos-id {eos_id} < --vocab-size {vocab_size} < 2**32")
    if (out / MANIFEST).exists() and not force:
        raise SmdmIOError(f"{out / MANIFEST}: exists (use --force to replace it)")
    files = find_litpkds_files(src, prefix)
    if not files:
        raise SmdmFormatError(f"{src}: no {prefix}*.bin files to import")
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=progress is False or None)
    # Each file: header + a full read (ids, EOS count, CRC-32); the Rust id check releases the GIL.
    checked: list[tuple[dict, str]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1, 8)))
    try:
        results = pool.map(lambda f: litpkds_shard_entry(f, vocab_size, eos_id, last=f == files[-1]), files)
        for f, (entry, dtype) in zip(files, results):
            if checked and dtype != checked[0][1]:
                raise SmdmFormatError(
                    f"{f}: dtype {dtype}, but {files[0].name} holds {checked[0][1]} (one dataset, one dtype)"
                )
            checked.append((entry, dtype))
            bar.update(entry["bytes"])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the first bad file stops the scan of the others
        bar.close()
    shards = [e for e, _ in checked]
    info = dict(
        version=MANIFEST_VERSION,
        format="litpkds",
        vocab_size=vocab_size,
        eos_id=eos_id,
        bos_id=bos_id,
        dtype=checked[0][1],
        num_tokens=sum(e["num_tokens"] for e in shards),
        num_docs=sum(e["num_docs"] for e in shards),
        tokenizer=tok_rel,
        tokenizer_hash=tok_hash,
        shard_dir=".." if split else ".",
        imported_from=dict(prefix=prefix, documents="a document starts after each eos_id and at each file's start"),
        shards=shards,
    )
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise SmdmIOError(f"{out}: {e.strerror or e}") from e
    write_manifest(out, info)
    load_manifest(out)  # the reader accepts what was written
    shadow = [d / MANIFEST for d in ([src] if split else [src / s for s in SPLITS]) if (d / MANIFEST).is_file()]
    if shadow:  # resolve_dataset prefers DIR/manifest.json over DIR/train/manifest.json
        log(f"note: {src} holds both {out / MANIFEST} and {shadow[0]}; `--data {src}` reads {src / MANIFEST}")
    if info["num_docs"] == 0:
        log(f"note: no token equals eos_id {eos_id}: each file is one document (is --eos-id right?)")
    return dict(
        manifest=out / MANIFEST,
        files=len(shards),
        num_tokens=info["num_tokens"],
        num_docs=info["num_docs"],
        padding=sum(e.get("padding", 0) for e in shards),
        dtype=info["dtype"],
    )


def _cmd_import(args) -> int:
    try:
        r = import_litpkds(
            args.dir,
            vocab_size=args.vocab_size,
            eos_id=args.eos_id,
            prefix=args.prefix,
            split=args.split,
            tokenizer=args.tokenizer,
            eos_token=args.eos_token,
            force=args.force,
        )
    except (SmdmFormatError, SmdmIOError, ValueError) as e:
        print(f"smdm data import: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{r['manifest']}: {r['files']} files, {r['num_tokens']:,} tokens ({r['dtype']}){_padding(r['padding'])}, "
        f"{r['num_docs']:,} documents"
    )
    return 0


def _datasets(path: Path) -> list[Path]:
    """The datasets at `path`: itself (it has a manifest) or its splits. A split directory holding files but
    no manifest is an error, not skipped: its shards would otherwise pass `verify` unseen (an interrupted
    prepare, or a deleted manifest, which the trainer reads as "no validation split")."""
    if (path / MANIFEST).is_file():
        return [path]
    for s in SPLITS:
        d = split_without_manifest(path, s)
        if d is not None:
            raise SmdmFormatError(f"{d}: holds {sum(1 for _ in d.iterdir())} files but no {MANIFEST} (an "
                                  f"interrupted `smdm prepare`, or a deleted manifest): not a dataset; "
                                  f"prepare it again")
    found = [path / s for s in SPLITS if (path / s / MANIFEST).is_file()]
    if not found:
        raise SmdmIOError(f"{path}: no {MANIFEST} here or in {'/'.join(SPLITS)}/ (not a prepared directory)")
    return found


def padding_note(where: str, num_tokens: int, padding: int) -> Optional[str]:
    """A note when more than half of a LITPKDS split is the EOS padding of its last chunk (a corpus smaller
    than one chunk: lit-gpt's 2049 x 1024 tokens by default), which the reader serves as text, else None."""
    if num_tokens <= 0 or 2 * padding <= num_tokens:
        return None
    return (f"note: {padding / num_tokens:.0%} of {where} ({padding:,} of {num_tokens:,} tokens) is EOS padding of "
            f"its last LITPKDS chunk, which the reader serves like text: prepare it with a smaller "
            f"--shard-tokens (a multiple of the window length + 1, e.g. 2049 x k for --seq-len 2048)")


def _padding(n: int) -> str:
    return f" ({n:,} of them EOS padding the last LITPKDS chunk, as lit-gpt pads)" if n else ""


def _cmd_prepare(args) -> int:
    try:
        summary = _run_prepare(args)
    except (SmdmFormatError, SmdmIOError, ValueError) as e:
        print(f"smdm prepare: error: {e}", file=sys.stderr)
        return 1
    for s in SPLITS:
        r = summary[s]
        print(
            f"{args.out}/{s}: {r['num_tokens']:,} tokens{_padding(r['padding'])}, {r['num_docs']:,} documents, "
            f"{r['shards']} shards"
        )
    print(f"vocab_size {summary['vocab_size']}, eos_id {summary['eos_id']}, {summary['seconds']} s")
    for s in SPLITS:
        note = padding_note(f"{args.out}/{s}", summary[s]["num_tokens"], summary[s]["padding"])
        if note:
            print(note, file=sys.stderr)
    if summary["val"]["num_docs"] == 0:
        docs = summary["train"]["num_docs"]
        print(f"note: {args.out}/val is empty (--val-fraction {args.val_fraction} of {docs:,} documents): "
              f"`smdm train --data {args.out}` validates on it, so raise --val-fraction, or train with "
              f"--val-every 0", file=sys.stderr)
    return 0


def _run_prepare(args) -> dict:
    return prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        fmt=args.format,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        eos_token=args.eos_token,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        text_field=args.text_field,
        force=args.force,
    )


def _cmd_verify(args) -> int:
    path = Path(args.dir)
    try:
        for d in _datasets(path):
            m = verify_dataset(d)
            print(f"{d}: OK ({len(m.shards)} shards, {m.num_tokens:,} tokens)")
    except (SmdmFormatError, SmdmIOError) as e:
        print(f"smdm data verify: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args) -> int:
    path = Path(args.dir)
    try:
        for d in _datasets(path):
            m = load_manifest(d)
            print(f"{d}")
            print(
                f"  format {m.format}, dtype {m.dtype}, vocab_size {m.vocab_size}, eos_id {m.eos_id}, "
                f"bos_id {m.bos_id}"
            )
            pad = sum(s.padding for s in m.shards)
            print(f"  {m.num_tokens:,} tokens{_padding(pad)}, {m.num_docs:,} documents, {len(m.shards)} shards")
            for s in m.shards[: args.max_shards]:
                print(
                    f"    {s.path.name}: {s.num_tokens:,} tokens{f' ({s.padding:,} padding)' if s.padding else ''}, "
                    f"{s.num_docs:,} docs, crc32 {s.crc32:#010x}"
                )
            if len(m.shards) > args.max_shards:
                print(f"    ... {len(m.shards) - args.max_shards} more")
            print(f"  tokenizer {m.tokenizer_path} ({m.tokenizer_hash})" if m.tokenizer_path is not None else
                  "  tokenizer: none recorded (no decoded sample; `smdm data import --tokenizer` records one)")
            sample = decode_sample(m, args.sample_tokens) if args.sample_tokens else None
            if sample is not None:
                print(f"  sample ({args.sample_tokens} tokens): {sample!r}")
    except (SmdmFormatError, SmdmIOError) as e:
        print(f"smdm data inspect: {e}", file=sys.stderr)
        return 1
    return 0


def register(parser, name: str) -> None:
    from smdm.cli import nonnegative_int

    if name == "prepare":
        parser.description = ("text -> tokenizer -> shards: `.txt` / `.jsonl` / `.parquet` files (or dirs of "
                              "them; no INPUT: the built-in stdlib corpus) into OUT/train, OUT/val and "
                              "OUT/tokenizer.json")
        parser.add_argument("inputs", nargs="*", metavar="INPUT",
                            help=".txt/.jsonl/.parquet files or dirs: a .txt file is one document, a .jsonl line "
                                 "or a parquet row one each (the train/val split is by document)")
        parser.add_argument("--out", required=True, help="output directory")
        g = parser.add_mutually_exclusive_group()
        g.add_argument("--tokenizer", help="an existing tokenizer.json")
        g.add_argument(
            "--vocab-size", type=int, help=f"train a BPE tokenizer of N ids (default {DEFAULT_VOCAB})"
        )
        parser.add_argument("--format", choices=["smdm", "litpkds"], default="smdm")
        parser.add_argument("--val-fraction", type=float, default=0.02, help="share of documents in val/")
        parser.add_argument(
            "--shard-tokens", type=int, help="tokens per shard (default 2^24; litpkds 2049*1024)"
        )
        parser.add_argument("--eos-token", help="name of the EOS token (default: found by the usual names)")
        parser.add_argument("--tokenizer-sample-mb", type=float, default=8.0, help="text to train BPE on")
        parser.add_argument(
            "--text-field", default="text", help="jsonl field / parquet column holding the text (default text)"
        )
        parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
        parser.set_defaults(func=_cmd_prepare)
        return
    sub = parser.add_subparsers(dest="data_command", metavar="{verify,inspect,import}")
    v = sub.add_parser("verify", help="check every shard against its header and the manifest")
    v.add_argument("dir", help="a prepared directory or a dataset directory")
    v.set_defaults(func=_cmd_verify)
    i = sub.add_parser("inspect", help="counts, dtype, tokenizer and a decoded sample")
    i.add_argument("dir", help="a prepared directory or a dataset directory")
    i.add_argument("--sample-tokens", type=nonnegative_int, default=64,
                   help="tokens of the decoded sample (0: none)")
    i.add_argument("--max-shards", type=nonnegative_int, default=10, help="shards listed (0: none)")
    i.set_defaults(func=_cmd_inspect)
    imp = sub.add_parser(
        "import",
        help="write a manifest for a lit-gpt/TinyLlama directory of LITPKDS .bin chunks (files untouched)",
        description=IMPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("dir", help="the directory holding the .bin chunk files")
    imp.add_argument("--vocab-size", type=int, help="token ids are < N (default: the --tokenizer's)")
    imp.add_argument("--eos-id", type=int, help="the id ending each document (default: the --tokenizer's)")
    imp.add_argument("--prefix", default="", help="import only files named PREFIX*.bin (e.g. train_slim)")
    imp.add_argument("--split", help="write DIR/SPLIT/manifest.json (train, val) instead of DIR/manifest.json")
    imp.add_argument("--tokenizer", help="the tokenizer.json of this data (recorded with its hash; optional)")
    imp.add_argument("--eos-token", help="with --tokenizer: name of the EOS token (default: the usual names)")
    imp.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    imp.set_defaults(func=_cmd_import)
