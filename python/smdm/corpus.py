"""Documents for `smdm prepare`: user files (.txt, .jsonl, .parquet, or directories of them) and the
built-in corpus (the Python standard library's own `.py` sources on this machine).

Every document comes with a stable *key* (file path relative to its input root, plus the line/row for
multi-document files); the train/val split is a hash of that key, so it never depends on file order,
on the number of processes or on which other files are present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from smdm.errors import SmdmFormatError, SmdmIOError

SUFFIXES = (".txt", ".jsonl", ".parquet")
# Parts of the stdlib tree that are not the standard library's own sources.
BUILTIN_EXCLUDE = {"site-packages", "dist-packages", "__pycache__"}


class Doc(NamedTuple):
    key: str  # stable identity, e.g. "json/decoder.py" or "data.jsonl:17"
    text: str


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable ~val_fraction of keys (blake2b of the key), else 'train'."""
    # surrogateescape: a file name that is not UTF-8 reaches Python with lone surrogates (the same bytes back)
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files() -> list[tuple[Path, str]]:
    """(path, key) of the stdlib's `.py` files (tests included, installed packages excluded), sorted."""
    root = stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if BUILTIN_EXCLUDE & set(rel.parts[:-1]) or not p.is_file():
            continue
        out.append((p, rel.as_posix()))
    out.sort(key=lambda x: x[1])
    return out


def builtin_docs() -> Iterator[Doc]:
    """The built-in corpus: one document per stdlib `.py` file (files that are not UTF-8 are skipped:
    CPython's test suite holds a few deliberately mis-encoded ones)."""
    for p, key in builtin_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Doc(key, text)


def expand_inputs(inputs: Sequence[str]) -> list[tuple[Path, str]]:
    """(path, key prefix) of every input file; directories contribute their .txt/.jsonl/.parquet files."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not files:
                raise SmdmFormatError(f"{p}: directory has no {'/'.join(SUFFIXES)} files")
            out += [(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise SmdmFormatError(
                    f"{p}: unsupported input type {p.suffix!r} (expected {', '.join(SUFFIXES)})"
                )
            out.append((p, p.name))
        elif not p.exists():
            raise SmdmIOError(f"{p}: no such file or directory")
        else:
            raise SmdmIOError(f"{p}: not a regular file")
    for p, _ in out:
        if p.suffix == ".parquet":
            _require_pyarrow(p)
            break
    return out


def _decode(path: Path, raw: bytes, base: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SmdmFormatError(f"{path}: not UTF-8 at byte offset {base + e.start}") from e


def file_docs(path: Path, key: str, text_field: str = "text") -> Iterator[Doc]:
    """Documents of one input file: a .txt is one document; a .jsonl has one per line (field `text_field`);
    a .parquet one per row of its `text_field` column (needs pyarrow; read one row group at a time)."""
    if path.suffix == ".parquet":
        yield from _parquet_docs(path, key, text_field)
        return
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    if path.suffix == ".txt":
        yield Doc(key, _decode(path, raw))
        return
    offset = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(_decode(path, line, start))
        except json.JSONDecodeError as e:
            raise SmdmFormatError(f"{path}:{lineno}: not valid JSON (byte offset {start}): {e.msg}") from e
        except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, arrays nested too deep
            raise SmdmFormatError(f"{path}:{lineno}: JSON that Python cannot read (byte offset {start}): {e}") from e
        if not isinstance(obj, dict) or text_field not in obj:
            raise SmdmFormatError(f"{path}:{lineno}: no {text_field!r} field (byte offset {start})")
        text = obj[text_field]
        if not isinstance(text, str):
            raise SmdmFormatError(
                f"{path}:{lineno}: field {text_field!r} is not a string (byte offset {start})"
            )
        if b"\\u" in line:  # only a \u escape can give a lone surrogate, which no tokenizer can take
            _check_unicode(path, lineno, start, text_field, text)
        yield Doc(f"{key}:{lineno}", text)


def _check_unicode(path: Path, lineno: int, start: int, text_field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SmdmFormatError(
            f"{path}:{lineno}: field {text_field!r} holds the lone surrogate {text[e.start]!r} at character "
            f"{e.start} (line at byte offset {start}): not valid Unicode text"
        ) from None


def _require_pyarrow(path: Path) -> None:
    """Fail before any work when a .parquet input is given but pyarrow is not installed (without
    importing it: `import smdm` and text-only runs never load pyarrow)."""
    if importlib.util.find_spec("pyarrow") is None:
        raise SmdmFormatError(
            f"{path}: reading .parquet input needs pyarrow, which is not installed (pip install pyarrow)"
        )


def _parquet_docs(path: Path, key: str, text_field: str) -> Iterator[Doc]:
    """One document per row (key `file.parquet:ROW`, 0-based over the whole file), streamed one row
    group at a time so a large file never sits in memory. The column must hold strings; a null is an
    error (as a non-string `text` is in a .jsonl), naming the file, column and row."""
    _require_pyarrow(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    except pa.ArrowException as e:  # ArrowInvalid: empty file, bad magic, corrupt footer
        raise SmdmFormatError(f"{path}: not a readable parquet file: {e}") from e
    with f:
        schema = f.schema_arrow
        if schema.get_field_index(text_field) < 0:
            have = ", ".join(repr(n) for n in schema.names) or "none"
            raise SmdmFormatError(f"{path}: no {text_field!r} column (columns: {have})")
        kind = schema.field(text_field).type
        if not _is_text(pa, kind):
            raise SmdmFormatError(
                f"{path}: column {text_field!r} has type {kind}, expected strings (choose the text column "
                "with --text-field)"
            )
        row = 0
        for g in range(f.num_row_groups):
            try:
                col = f.read_row_group(g, columns=[text_field]).column(text_field)
            except pa.ArrowException as e:
                raise SmdmFormatError(f"{path}: row group {g} of column {text_field!r}: {e}") from e
            if col.null_count:
                first = row + next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
                raise SmdmFormatError(
                    f"{path}: row {first} (0-based): column {text_field!r} is null (expected a string)"
                )
            for text in col.to_pylist():
                yield Doc(f"{key}:{row}", text)
                row += 1


def _is_text(pa, kind) -> bool:
    """A string column: string, large_string, string_view, or dictionary-encoded strings (pandas category)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or bool(view and view(kind))


def input_docs(inputs: Sequence[str], text_field: str = "text") -> Iterator[Doc]:
    """All documents of the inputs, in order; with no inputs, the built-in corpus."""
    if not inputs:
        yield from builtin_docs()
        return
    for path, key in expand_inputs(inputs):
        yield from file_docs(path, key, text_field)


def input_bytes(inputs: Sequence[str], text_field: str = "text") -> int:
    """Size of the inputs' text (for the progress bar and the BPE sample fraction): file sizes, except that a
    .parquet counts the uncompressed size of its text column (its compressed size would undercount)."""
    files = [p for p, _ in builtin_files()] if not inputs else [p for p, _ in expand_inputs(inputs)]
    return sum(_parquet_text_bytes(p, text_field) if p.suffix == ".parquet" else os.path.getsize(p) for p in files)


def _parquet_text_bytes(path: Path, text_field: str) -> int:
    """Uncompressed bytes of the `text_field` column from the parquet footer (the file size when the
    footer cannot be read: reading the file then reports the precise error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        md = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):
        return os.path.getsize(path)
    total = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        total += sum(
            rg.column(i).total_uncompressed_size
            for i in range(rg.num_columns)
            if rg.column(i).path_in_schema == text_field
        )
    return total
