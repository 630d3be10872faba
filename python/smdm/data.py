"""smdm data: shard files, dataset manifests, packing, and the packed-window reader used for training.

Layout of a prepared directory (`smdm prepare ... --out DIR`, see docs/CONTRACTS.md):

    DIR/tokenizer.json
    DIR/train/manifest.json  DIR/train/shard_00000.smdm ...     (a *dataset directory*: has manifest.json)
    DIR/val/manifest.json    DIR/val/shard_00000.smdm ...

A lit-gpt / TinyLlama directory of LITPKDS chunks gets a manifest from `smdm data import` without its
files being touched: DIR/manifest.json, or DIR/train/manifest.json + DIR/val/manifest.json whose
`shard_dir` ".." points back at the chunks in DIR.

Two shard formats:
- smdm shard v1 (`rust/src/shard.rs` has the byte layout): 64-byte header (magic `SMDMSHRD`, version, dtype,
  token/document counts, vocab size, EOS/BOS ids, payload CRC-32, header CRC-32), the token stream
  (uint16 when vocab_size < 65536, else uint32) padded to 8 bytes, then the uint64 document starts.
- lit-gpt / TinyLlama `LITPKDS` (what SMDM's data uses): 24-byte header then raw tokens; documents are
  delimited by EOS only.
`write_shard_numpy` / `read_shard_numpy` / `write_litpkds_numpy` / `read_litpkds_numpy` are the plain
numpy references that define the formats; `write_shard` / `read_shard` / ... use the Rust core
(`smdm._core`) unless SMDM_REFERENCE=1. Tests check both produce identical bytes.

Packing = documents' token ids -> one stream with an EOS after each document + each document's start
offset (`pack_documents`). Windows need no copy: the reader slices the memory-mapped stream.

Reader (`PackedDataset`): per shard, non-overlapping windows of `seq_len` (+1 for the ARM) tokens at stride
`seq_len`; a window id is its index in the concatenation of all shards' windows. Each epoch serves the
windows in a pseudo-random order that is a pure function of (seed, epoch): a Feistel-network bijection
on [0, n_windows) (cycle-walking), so position -> window is O(1) with no permutation table, and resuming
at any (epoch, batch) is O(1). Rank r takes positions [r * S, (r + 1) * S) of the order (S = batches per
rank * batch size, remainder dropped); DataLoader worker w takes the rank's batches w, w + W, ...
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from smdm import rng
from smdm.errors import SmdmFormatError, SmdmIOError

PathLike = Union[str, "os.PathLike[str]"]

SHARD_MAGIC = b"SMDMSHRD"
SHARD_VERSION = 1
SHARD_HEADER_LEN = 64
NO_BOS = 0xFFFFFFFF
LITPKDS_MAGIC = b"LITPKDS"
LITPKDS_VERSION = 1
LITPKDS_HEADER_LEN = 24
# lit-gpt's dtype codes
LITPKDS_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# 4th key word of the shuffle's round keys (distinct from the masking streams in smdm.rng.Stream)
SHUFFLE_STREAM = 0x5348_5546


def use_reference() -> bool:
    """SMDM_REFERENCE=1 forces the numpy reference implementations instead of the Rust core."""
    return os.environ.get("SMDM_REFERENCE", "") not in ("", "0")


def _core():
    from smdm import _core

    return _core


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id and the mask id (= vocab_size) fit, else uint32."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


def litpkds_dtype_code(vocab_size: int) -> int:
    """lit-gpt's `dtype="auto"`: uint16 (code 8) below 65500 ids, else int32 (code 4)."""
    return 8 if vocab_size < 65500 else 4


def file_crc32(path: PathLike) -> int:
    """CRC-32 (zlib) of a whole file, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def save_safetensors(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> None:
    """`safetensors.torch.save_file`, then the file's mode as the umask gives any new file (0644 under the usual
    022): safetensors writes 0600, so a shared checkpoint or export was unreadable to everyone but its writer.
    A failed write (safetensors' own error type, not OSError) is an `SmdmIOError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except SafetensorError as e:  # its own type for a full disk or an unwritable file: an OSError naming the path
        raise SmdmIOError(f"{path}: cannot write: {e}") from e
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


_TEMP_COUNTER = itertools.count()


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden name next to `path` that no other write uses: `.NAME.KIND-PID-N`, N counting this process's
    calls (two threads writing the same path must not share, and truncate, one temporary file)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{next(_TEMP_COUNTER)}")


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename, fsync the directory (so the rename
    itself survives a crash). Readers see the old file or the new one, never a partial one; of two
    concurrent writers of one path the last rename wins, whole."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    try:  # not every platform / filesystem can open or fsync a directory: best effort
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# smdm shard v1: numpy reference
# ---------------------------------------------------------------------------------------------------------
def _bad_token_msg(token: int, index: int, byte_offset: int, vocab_size: int) -> str:
    if token == vocab_size:
        return (
            f"token id {token} at token {index} (byte offset {byte_offset}) equals the mask id "
            f"(vocab_size {vocab_size})"
        )
    return f"token id {token} at token {index} (byte offset {byte_offset}) >= vocab_size {vocab_size}"


def _int_ids(a, what: str = "token ids") -> np.ndarray:
    """`a` as an array, refused unless it holds integers: a float array would be truncated silently
    (1.7 -> 1) by the casts that follow (an empty array of any dtype is fine: `np.asarray([])` is float)."""
    a = np.asarray(a)
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got an array of dtype {a.dtype}")
    return a


def _ids_u32(a) -> np.ndarray:
    """Integer token ids as uint32 (values checked, never wrapped)."""
    a = _int_ids(a)
    if a.dtype == np.uint32:
        return a
    if a.size and (a.min() < 0 or a.max() >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    return a.astype(np.uint32)


def encode_shard_numpy(
    tokens: np.ndarray, doc_starts: np.ndarray, vocab_size: int, eos_id: int, bos_id: Optional[int] = None
) -> bytes:
    """The bytes of an smdm shard v1 (reference implementation; see the module docstring)."""
    tokens = _int_ids(tokens)
    starts = np.asarray(doc_starts, dtype="<u8")
    if not 0 < vocab_size < 2**32 or not 0 <= eos_id < vocab_size:
        raise ValueError(f"need 0 <= eos_id {eos_id} < vocab_size {vocab_size} < 2**32")
    if bos_id is not None and not 0 <= bos_id < vocab_size:
        raise ValueError(f"bos_id {bos_id} >= vocab_size {vocab_size}")
    dt = shard_dtype(vocab_size)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        i = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise ValueError(_bad_token_msg(int(tokens[i]), i, SHARD_HEADER_LEN + i * dt.itemsize, vocab_size))
    n = tokens.size
    _check_starts_numpy("<tokens>", starts, n, 0, ValueError)
    tok = tokens.astype(dt).tobytes()
    tok += b"\0" * (-len(tok) % 8)
    payload = tok + starts.tobytes()
    head = (
        SHARD_MAGIC
        + np.array([SHARD_VERSION, dt.itemsize], "<u4").tobytes()
        + np.array([n, starts.size], "<u8").tobytes()
        + np.array(
            [vocab_size, eos_id, NO_BOS if bos_id is None else bos_id, zlib.crc32(payload)], "<u4"
        ).tobytes()
        + b"\0" * 12
    )
    head += np.array([zlib.crc32(head)], "<u4").tobytes()
    return head + payload


def write_shard_numpy(path: PathLike, tokens, doc_starts, vocab_size: int, eos_id: int, bos_id=None) -> dict:
    data = encode_shard_numpy(tokens, doc_starts, vocab_size, eos_id, bos_id)
    write_atomic(path, data)
    info = _decode_header_numpy(Path(path), data[:SHARD_HEADER_LEN])
    info.update(file_crc32=zlib.crc32(data), file_bytes=len(data))
    return info


def _check_starts_numpy(where, starts: np.ndarray, n_tokens: int, table_offset: int, exc=SmdmFormatError):
    if (n_tokens == 0) != (starts.size == 0):
        raise exc(
            f"{where}: {starts.size} documents for {n_tokens} tokens (offset table at byte {table_offset})"
        )
    if starts.size:
        ok = np.ones(starts.size, bool)
        ok[0] = starts[0] == 0
        ok[1:] = starts[1:] > starts[:-1]
        ok &= starts < n_tokens
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise exc(
                f"{where}: bad document start {int(starts[i])} for document {i} at byte offset "
                f"{table_offset + 8 * i} (starts must increase strictly from 0 and be < n_tokens {n_tokens})"
            )


def _decode_header_numpy(path: Path, b: bytes) -> dict:
    if len(b) < SHARD_HEADER_LEN:
        raise SmdmFormatError(
            f"{path}: truncated: {len(b)} bytes, shorter than the 64-byte smdm shard header"
        )
    if b[:8] != SHARD_MAGIC:
        raise SmdmFormatError(
            f"{path}: bad magic at offset 0: {b[:8]!r}, expected b'SMDMSHRD' (not an smdm shard)"
        )
    u32 = np.frombuffer(b, "<u4")
    u64 = np.frombuffer(b[16:32], "<u8")
    if int(u32[2]) != SHARD_VERSION:
        raise SmdmFormatError(f"{path}: unsupported shard version {int(u32[2])} at offset 8")
    if int(u32[15]) != zlib.crc32(b[:60]):
        raise SmdmFormatError(f"{path}: header checksum mismatch at offset 60")
    itemsize = int(u32[3])
    if itemsize not in (2, 4):
        raise SmdmFormatError(f"{path}: bad dtype {itemsize} at offset 12 (expected itemsize 2 or 4)")
    if any(b[48:60]):
        raise SmdmFormatError(f"{path}: reserved header bytes 48..60 are not zero")
    vocab, eos, bos = int(u32[8]), int(u32[9]), int(u32[10])
    if vocab == 0 or shard_dtype(vocab).itemsize != itemsize:
        raise SmdmFormatError(
            f"{path}: dtype itemsize {itemsize} (offset 12) does not match vocab_size {vocab}"
        )
    if eos >= vocab or (bos != NO_BOS and bos >= vocab):
        raise SmdmFormatError(f"{path}: eos_id {eos} / bos_id {bos} (offsets 36, 40) >= vocab_size {vocab}")
    return dict(
        version=SHARD_VERSION,
        dtype=shard_dtype(vocab).name,
        num_tokens=int(u64[0]),
        num_docs=int(u64[1]),
        vocab_size=vocab,
        eos_id=eos,
        bos_id=None if bos == NO_BOS else bos,
        payload_crc32=int(u32[11]),
    )


def read_shard_numpy(path: PathLike, verify: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """(header dict, tokens, document starts) of an smdm shard; reference reader with the same checks."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    h = _decode_header_numpy(path, data[:SHARD_HEADER_LEN])
    dt = shard_dtype(h["vocab_size"])
    n, d = h["num_tokens"], h["num_docs"]
    tok_len = (n * dt.itemsize + 7) // 8 * 8
    want = SHARD_HEADER_LEN + tok_len + 8 * d
    if len(data) < want:
        raise SmdmFormatError(f"{path}: truncated: {len(data)} bytes, the header implies {want}")
    if len(data) > want:
        raise SmdmFormatError(f"{path}: {len(data) - want} unexpected trailing bytes after offset {want}")
    tokens = np.frombuffer(data, dt, n, SHARD_HEADER_LEN)
    table = SHARD_HEADER_LEN + tok_len
    starts = np.frombuffer(data, "<u8", d, table)
    h["file_bytes"] = len(data)
    if verify:
        if zlib.crc32(data[SHARD_HEADER_LEN:]) != h["payload_crc32"]:
            raise SmdmFormatError(
                f"{path}: payload checksum mismatch (bytes 64..{len(data)}); the file is corrupt"
            )
        if any(data[SHARD_HEADER_LEN + n * dt.itemsize : table]):
            raise SmdmFormatError(f"{path}: non-zero padding before offset {table}")
        _check_starts_numpy(path, starts, n, table)
        bad = np.flatnonzero(tokens >= h["vocab_size"])
        if bad.size:
            i = int(bad[0])
            raise SmdmFormatError(
                f"{path}: "
                + _bad_token_msg(int(tokens[i]), i, SHARD_HEADER_LEN + i * dt.itemsize, h["vocab_size"])
            )
        h["file_crc32"] = zlib.crc32(data)
    return h, tokens.copy(), starts.copy()


# ---------------------------------------------------------------------------------------------------------
# LITPKDS: numpy reference
# ---------------------------------------------------------------------------------------------------------
def encode_litpkds_numpy(tokens, dtype_code: int) -> bytes:
    """Bytes of a LITPKDS file holding exactly `tokens` (lit-gpt `PackedDatasetBuilder._write_chunk`)."""
    if dtype_code not in LITPKDS_DTYPES:
        raise ValueError(f"LITPKDS dtype code must be 1..8, got {dtype_code}")
    dt = np.dtype(LITPKDS_DTYPES[dtype_code]).newbyteorder("<")
    arr = np.asarray(tokens) if dt.kind == "f" else _int_ids(tokens)
    if arr.size and dt.kind in "iu" and (arr.min() < 0 or arr.max() > np.iinfo(dt).max):
        raise ValueError(f"token ids do not fit LITPKDS dtype code {dtype_code}")
    head = LITPKDS_MAGIC + np.array([LITPKDS_VERSION], "<u8").tobytes() + bytes([dtype_code])
    head += np.array([arr.size], "<u8").tobytes()
    return head + arr.astype(dt).tobytes(order="C")


def write_litpkds_numpy(path: PathLike, tokens, dtype_code: int) -> int:
    data = encode_litpkds_numpy(tokens, dtype_code)
    write_atomic(path, data)
    return zlib.crc32(data)


def read_litpkds_numpy(path: PathLike) -> tuple[int, int, np.ndarray]:
    """(dtype code, chunk_size, items) of a LITPKDS file, with the header and length checked."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    if len(data) < LITPKDS_HEADER_LEN:
        raise SmdmFormatError(
            f"{path}: truncated: {len(data)} bytes, shorter than the 24-byte LITPKDS header"
        )
    if data[:7] != LITPKDS_MAGIC:
        raise SmdmFormatError(f"{path}: bad magic at offset 0: {data[:7]!r}, expected b'LITPKDS'")
    version = int(np.frombuffer(data, "<u8", 1, 7)[0])
    if version != LITPKDS_VERSION:
        raise SmdmFormatError(f"{path}: unsupported LITPKDS version {version} at offset 7 (expected 1)")
    code = data[15]
    if code not in LITPKDS_DTYPES:
        raise SmdmFormatError(f"{path}: bad dtype code {code} at offset 15 (expected 1..8)")
    chunk = int(np.frombuffer(data, "<u8", 1, 16)[0])
    dt = np.dtype(LITPKDS_DTYPES[code]).newbyteorder("<")
    want = LITPKDS_HEADER_LEN + chunk * dt.itemsize
    if len(data) != want:
        what = "truncated" if len(data) < want else "trailing bytes"
        raise SmdmFormatError(
            f"{path}: {what}: {len(data)} bytes, but chunk_size {chunk} (offset 16) implies {want}"
        )
    return code, chunk, np.frombuffer(data, dt, chunk, LITPKDS_HEADER_LEN).copy()


# ---------------------------------------------------------------------------------------------------------
# Fast paths (Rust) with the reference as fallback
# ---------------------------------------------------------------------------------------------------------
def write_shard(path: PathLike, tokens, doc_starts, *, vocab_size: int, eos_id: int, bos_id=None) -> dict:
    """Write an smdm shard atomically. Returns the header dict + `file_crc32`, `file_bytes`."""
    tokens = _int_ids(tokens)
    starts = np.ascontiguousarray(doc_starts, dtype=np.uint64)
    if use_reference():
        return write_shard_numpy(path, tokens, starts, vocab_size, eos_id, bos_id)
    if tokens.dtype not in (np.uint16, np.uint32):
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
            raise ValueError("token ids must be in [0, 2**32)")
        tokens = tokens.astype(np.uint32)
    return _core().shard_write(
        os.fspath(path), np.ascontiguousarray(tokens), starts, vocab_size, eos_id, bos_id
    )


def read_shard(path: PathLike, verify: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """(header dict, tokens in the file dtype, uint64 document starts); `verify` checks CRC and ids."""
    if use_reference():
        return read_shard_numpy(path, verify)
    return _core().shard_read(os.fspath(path), verify)


def shard_info(path: PathLike, verify: bool = True) -> dict:
    """Header of a shard (checked); with `verify`, payload checked too and `file_crc32` added."""
    if use_reference():
        return read_shard_numpy(path, verify)[0]
    return _core().shard_info(os.fspath(path), verify)


def write_litpkds(path: PathLike, tokens, dtype_code: int) -> int:
    """Write one LITPKDS file holding exactly `tokens`; returns the file's CRC-32."""
    tokens = np.asarray(tokens) if dtype_code in (6, 7) else _int_ids(tokens)
    if use_reference() or dtype_code in (6, 7):
        return write_litpkds_numpy(path, tokens, dtype_code)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    return _core().litpkds_write(os.fspath(path), np.ascontiguousarray(tokens, dtype=np.uint32), dtype_code)


def read_litpkds(path: PathLike) -> tuple[int, int, np.ndarray]:
    """(dtype code, chunk_size, items in the file's dtype)."""
    if use_reference():
        return read_litpkds_numpy(path)
    return _core().litpkds_read(os.fspath(path))


def pack_documents_numpy(tokens: np.ndarray, lengths: np.ndarray, eos_id: int, vocab_size: int):
    """Reference packing: (stream = each document + [eos], in the shard dtype; uint64 document starts)."""
    tokens = _int_ids(tokens)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != tokens.size:
        raise ValueError(f"document lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} >= vocab_size {vocab_size}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        i = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise ValueError(f"token id {int(tokens[i])} at input position {i} >= vocab_size {vocab_size}")
    starts = np.zeros(lengths.size, np.uint64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    stream = np.empty(tokens.size + lengths.size, shard_dtype(vocab_size))
    is_doc = np.ones(stream.size, bool)
    is_doc[(starts + lengths.astype(np.uint64)).astype(np.int64)] = False
    stream[is_doc] = tokens
    stream[~is_doc] = eos_id
    return stream, starts


def pack_documents(docs, eos_id: int, vocab_size: int, lengths=None):
    """Pack documents into one stream with an EOS after each; returns (stream, uint64 starts).

    `docs` is a list of 1-D integer arrays, or (with `lengths`) all documents concatenated. The stream is
    uint16 when vocab_size < 65536 else uint32; every id must be < vocab_size (the mask id never enters).
    """
    if lengths is None:
        lengths = np.fromiter((len(d) for d in docs), np.uint64, len(docs))
        flat = (
            np.concatenate([_ids_u32(d) for d in docs])
            if len(docs)
            else np.zeros(0, np.uint32)
        )
    else:
        flat = _int_ids(docs)
        lengths = np.asarray(_int_ids(lengths, "document lengths"), dtype=np.uint64)
    if use_reference():
        return pack_documents_numpy(flat, lengths, eos_id, vocab_size)
    flat = _ids_u32(flat)
    return _core().pack_documents(
        np.ascontiguousarray(flat), np.ascontiguousarray(lengths), eos_id, vocab_size
    )


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardEntry:
    path: Path  # absolute path of the shard file
    num_tokens: int  # tokens in the file (LITPKDS: chunk_size, padding included)
    num_docs: int  # documents (LITPKDS: EOS tokens, less the padding's)
    bytes: int  # file size
    crc32: int  # CRC-32 of the whole file
    padding: int = 0  # LITPKDS of `smdm prepare` / `data import`: EOS tokens filling a chunk's end (in num_tokens)


@dataclasses.dataclass(frozen=True)
class Manifest:
    root: Path  # the dataset directory
    format: str  # "smdm" or "litpkds"
    vocab_size: int  # token ids are < vocab_size; the MDM mask id is vocab_size
    eos_id: int
    bos_id: Optional[int]
    dtype: str  # numpy dtype name of the stored tokens
    num_tokens: int
    num_docs: int
    shards: tuple  # of ShardEntry, in order
    tokenizer_path: Optional[Path]  # the tokenizer.json this data was made with (None if not recorded)
    tokenizer_hash: Optional[str]  # "sha256:<hex>" of the tokenizer.json bytes


def load_tokenizer(path: PathLike, *, as_data: bool = False):
    """A Python `tokenizers.Tokenizer` from a tokenizer.json, with its truncation and padding off: those are
    settings for batches of model inputs, and they would silently cut or pad smdm's prompts and documents.
    `as_data=True` also encodes special tokens written in a text as the text they are (`</s>` in a web page
    is not an EOS), as `smdm prepare` does: then `encode(text, add_special_tokens=False).ids` equals the ids
    prepare stores. A file that does not parse is an `SmdmFormatError` naming it."""
    from tokenizers import Tokenizer

    try:  # the `tokenizers` package raises a bare Exception for a file that does not parse
        tok = Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001
        raise SmdmFormatError(f"{path}: not a readable tokenizer.json: {e}") from e
    except BaseException as e:  # its Rust code panics on some malformed files: a pyo3 PanicException
        if type(e).__name__ != "PanicException":
            raise
        raise SmdmFormatError(f"{path}: not a readable tokenizer.json (the tokenizers library panicked: {e})") from e
    tok.no_truncation()
    tok.no_padding()
    if as_data:
        tok.encode_special_tokens = True
    return tok


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def write_manifest(dataset_dir: PathLike, info: dict) -> Path:
    """Write DIR/manifest.json atomically (the last file of a dataset: its presence means 'complete')."""
    path = Path(dataset_dir) / MANIFEST
    write_atomic(path, (json.dumps(info, indent=1) + "\n").encode())
    return path


def load_manifest(dataset_dir: PathLike) -> Manifest:
    """Parse and check DIR/manifest.json (structure and totals; `verify_dataset` checks the files)."""
    root = Path(dataset_dir)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SmdmIOError(f"{path}: no manifest (not a dataset directory; run `smdm prepare`)") from e
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmdmFormatError(f"{path}: not valid JSON: {e}") from e

    def field(obj, key, kind, where=path):
        if not isinstance(obj, dict) or key not in obj:
            raise SmdmFormatError(f"{where}: missing field {key!r}")
        v = obj[key]
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise SmdmFormatError(f"{where}: field {key!r} must be a non-negative integer, got {v!r}")
        if kind is str and not isinstance(v, str):
            raise SmdmFormatError(f"{where}: field {key!r} must be a string, got {v!r}")
        return v

    if field(raw, "version", int) != MANIFEST_VERSION:
        raise SmdmFormatError(f"{path}: unsupported manifest version {raw['version']}")
    fmt = field(raw, "format", str)
    if fmt not in ("smdm", "litpkds"):
        raise SmdmFormatError(f"{path}: unknown shard format {fmt!r} (expected 'smdm' or 'litpkds')")
    vocab = field(raw, "vocab_size", int)
    eos = field(raw, "eos_id", int)
    bos = raw.get("bos_id")
    if bos is not None:
        bos = field(raw, "bos_id", int)
    for key in ("tokenizer", "tokenizer_hash"):
        if raw.get(key) is not None:
            field(raw, key, str)
    if vocab == 0 or vocab >= 2**32 or eos >= vocab or (bos is not None and bos >= vocab):
        raise SmdmFormatError(f"{path}: inconsistent ids: vocab_size {vocab}, eos_id {eos}, bos_id {bos}")
    # Where the shard files are, relative to this manifest: "." (default) or ".." (`smdm data import
    # --split S` puts S/manifest.json next to lit-gpt chunk files it must not move).
    shard_dir = raw.get("shard_dir", ".")
    if shard_dir not in (".", ".."):
        raise SmdmFormatError(f"{path}: field 'shard_dir' must be '.' or '..', got {shard_dir!r}")
    base = (root / shard_dir).resolve()
    shards_raw = field(raw, "shards", list) if isinstance(raw.get("shards"), list) else None
    if shards_raw is None:
        raise SmdmFormatError(f"{path}: field 'shards' must be a list")
    shards = []
    for i, s in enumerate(shards_raw):
        where = f"{path} shards[{i}]"
        name = field(s, "file", str, where)
        if Path(name).name != name or name in (".", ".."):
            raise SmdmFormatError(
                f"{where}: shard file {name!r} must be a plain file name (in the dataset dir or shard_dir)"
            )
        shards.append(
            ShardEntry(
                path=base / name,
                num_tokens=field(s, "num_tokens", int, where),
                num_docs=field(s, "num_docs", int, where),
                bytes=field(s, "bytes", int, where),
                crc32=field(s, "crc32", int, where),
                padding=field(s, "padding", int, where) if "padding" in s else 0,
            )
        )
    total = sum(s.num_tokens for s in shards)
    if field(raw, "num_tokens", int) != total:
        raise SmdmFormatError(f"{path}: num_tokens {raw['num_tokens']} != sum over shards {total}")
    dtype = field(raw, "dtype", str)
    num_docs = field(raw, "num_docs", int) if "num_docs" in raw else sum(s.num_docs for s in shards)
    tok = raw.get("tokenizer")
    tok_path = (root / tok).resolve() if isinstance(tok, str) else None
    return Manifest(
        root=root.resolve(),
        format=fmt,
        vocab_size=vocab,
        eos_id=eos,
        bos_id=bos,
        dtype=dtype,
        num_tokens=total,
        num_docs=num_docs,
        shards=tuple(shards),
        tokenizer_path=tok_path,
        tokenizer_hash=raw.get("tokenizer_hash"),
    )


def split_without_manifest(root: PathLike, split: str) -> Optional[Path]:
    """ROOT/SPLIT when it is a directory holding files but no manifest (an interrupted `smdm prepare`, or a
    deleted manifest): broken data, which `smdm data verify` and `smdm train` name instead of reading it as
    "no such split". Else None."""
    d = Path(root) / split
    if d.is_dir() and not (d / MANIFEST).is_file() and any(d.iterdir()):
        return d
    return None


def resolve_dataset(path: PathLike, split: str = "train") -> Path:
    """A dataset directory from a `smdm prepare` output dir (-> its `split`) or a dataset dir itself."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if (p / split / MANIFEST).is_file():
        return p / split
    if not p.exists():
        raise SmdmIOError(f"{p}: no such directory")
    raise SmdmIOError(f"{p}: neither a dataset directory nor a prepared directory with {split}/{MANIFEST}")


def _check_header_vs_manifest(m: Manifest, s: ShardEntry, h: dict) -> None:
    want = dict(vocab_size=m.vocab_size, eos_id=m.eos_id, bos_id=m.bos_id, dtype=m.dtype)
    want.update(num_tokens=s.num_tokens, num_docs=s.num_docs, file_bytes=s.bytes)
    for k, v in want.items():
        if h.get(k) != v:
            raise SmdmFormatError(
                f"{s.path}: {k} is {h.get(k)!r} in the file but {v!r} in {m.root / MANIFEST} "
                "(shards of different settings, or a stale manifest)"
            )


def check_shard(m: Manifest, s: ShardEntry, full: bool = True) -> Optional[np.ndarray]:
    """Check one shard against itself and the manifest. `full`: CRC and every token id too.
    Returns the LITPKDS tokens when it had to read them (None for smdm shards)."""
    if not s.path.is_file():
        raise SmdmIOError(f"{s.path}: listed in {m.root / MANIFEST} but missing")
    if m.format == "smdm":
        h = shard_info(s.path, verify=full)
        _check_header_vs_manifest(m, s, h)
        if full and h["file_crc32"] != s.crc32:
            raise SmdmFormatError(
                f"{s.path}: file CRC-32 {h['file_crc32']:#010x} != {s.crc32:#010x} in {m.root / MANIFEST}"
            )
        return None
    code, chunk, _ = _litpkds_header(s.path)
    if np.dtype(LITPKDS_DTYPES[code]).name != m.dtype or chunk != s.num_tokens:
        raise SmdmFormatError(
            f"{s.path}: dtype {np.dtype(LITPKDS_DTYPES[code]).name}, chunk_size {chunk} in the file but "
            f"{m.dtype}, {s.num_tokens} in {m.root / MANIFEST}"
        )
    if s.path.stat().st_size != s.bytes:
        raise SmdmFormatError(f"{s.path}: {s.path.stat().st_size} bytes, manifest says {s.bytes}")
    if not full:
        return None
    crc = file_crc32(s.path)
    if crc != s.crc32:
        raise SmdmFormatError(f"{s.path}: file CRC-32 {crc:#010x} != {s.crc32:#010x} in {m.root / MANIFEST}")
    return litpkds_tokens(s.path, m.vocab_size)


def litpkds_tokens(path: PathLike, vocab_size: int) -> np.ndarray:
    """The items of a LITPKDS file as token ids (uint32, whatever the file's integer dtype), each checked to
    be an integer in [0, vocab_size) (error naming the file, the token index and its byte offset)."""
    path = Path(path)
    if not use_reference():
        return _core().litpkds_tokens(os.fspath(path), vocab_size)
    code, _, toks = read_litpkds_numpy(path)
    if toks.dtype.kind == "f":
        raise SmdmFormatError(f"{path}: dtype code {code} (offset 15) is a float type; token ids must be integers")
    bad = np.flatnonzero((toks < 0) | (toks >= vocab_size))
    if bad.size:
        i = int(bad[0])
        at = LITPKDS_HEADER_LEN + i * toks.itemsize
        if toks[i] < 0:
            raise SmdmFormatError(
                f"{path}: token id {int(toks[i])} at token {i} (byte offset {at}) is not a valid id"
            )
        raise SmdmFormatError(f"{path}: " + _bad_token_msg(int(toks[i]), i, at, vocab_size))
    return toks.astype(np.uint32)


def _litpkds_header(path: Path) -> tuple[int, int, int]:
    """(dtype code, chunk_size, itemsize) with the length checked, reading only the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(LITPKDS_HEADER_LEN)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise SmdmIOError(f"{path}: {e.strerror or e}") from e
    if len(head) < LITPKDS_HEADER_LEN or head[:7] != LITPKDS_MAGIC or head[15] not in LITPKDS_DTYPES:
        read_litpkds_numpy(path)  # raises the precise error
    version = int(np.frombuffer(head, "<u8", 1, 7)[0])
    if version != LITPKDS_VERSION:
        raise SmdmFormatError(f"{path}: unsupported LITPKDS version {version} at offset 7 (expected 1)")
    code = head[15]
    chunk = int(np.frombuffer(head, "<u8", 1, 16)[0])
    isz = np.dtype(LITPKDS_DTYPES[code]).itemsize
    want = LITPKDS_HEADER_LEN + chunk * isz
    if size != want:
        raise SmdmFormatError(
            f"{path}: {'truncated' if size < want else 'trailing bytes'}: {size} bytes, but chunk_size "
            f"{chunk} (offset 16) of {isz}-byte items implies {want}"
        )
    if np.dtype(LITPKDS_DTYPES[code]).kind == "f":
        raise SmdmFormatError(
            f"{path}: dtype code {code} (offset 15) is a float type; token ids must be integers"
        )
    return code, chunk, isz


def verify_dataset(dataset_dir: PathLike, check_tokenizer: bool = True) -> Manifest:
    """Check every shard against its header and the manifest (CRC, sizes, ids); raise naming the bad file."""
    m = load_manifest(dataset_dir)
    for s in m.shards:
        check_shard(m, s, full=True)
    if check_tokenizer and m.tokenizer_path is not None:
        if not m.tokenizer_path.is_file():
            raise SmdmIOError(f"{m.tokenizer_path}: tokenizer listed in {m.root / MANIFEST} is missing")
        if m.tokenizer_hash is not None and sha256_file(m.tokenizer_path) != m.tokenizer_hash:
            raise SmdmFormatError(
                f"{m.tokenizer_path}: hash differs from tokenizer_hash in {m.root / MANIFEST}"
            )
    return m


# ---------------------------------------------------------------------------------------------------------
# A lit-gpt / TinyLlama directory of LITPKDS chunks that has no manifest (`smdm data import`)
# ---------------------------------------------------------------------------------------------------------
def natural_key(name: str) -> tuple:
    """Sort key that orders runs of digits by value: `x_2_0000000000.bin` before `x_10_0000000000.bin`."""
    return tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"([0-9]+)", name)))


def find_litpkds_files(src_dir: PathLike, prefix: str = "") -> list[Path]:
    """The regular files `{prefix}*.bin` directly in `src_dir` (hidden files skipped), in natural order."""
    src = Path(src_dir)
    try:
        names = [e.name for e in os.scandir(src) if e.is_file()]
    except OSError as e:
        raise SmdmIOError(f"{src}: {e.strerror or e}") from e
    names = [n for n in names if n.endswith(".bin") and n.startswith(prefix) and not n.startswith(".")]
    return [src / n for n in sorted(names, key=natural_key)]


def litpkds_shard_entry(path: PathLike, vocab_size: int, eos_id: int, last: bool = True) -> tuple[dict, str]:
    """(manifest shard entry, numpy dtype name) of one LITPKDS file, fully checked with the reader's own
    checks: magic, version, integer dtype code, exact length for chunk_size, every id < vocab_size.
    `num_docs` counts the EOS tokens (documents end there), except that in the split's `last` file a run of
    EOS tokens ending it is one document's end and then padding (`smdm prepare --format litpkds` fills its
    last chunk with EOS): the entry says the run's rest apart as `padding`, as prepare's own manifest does.
    In any other file every EOS ends a document (an empty document is a lone EOS)."""
    path = Path(path)
    code, chunk, _ = _litpkds_header(path)
    toks = litpkds_tokens(path, vocab_size)
    ends = int(np.count_nonzero(toks == eos_id))
    pad = 0
    if last:
        not_eos = np.flatnonzero(toks[::-1] != eos_id)
        pad = max(0, (int(not_eos[0]) if not_eos.size else toks.size) - 1)  # the trailing EOS run, less one
    entry = dict(file=path.name, num_tokens=chunk, num_docs=ends - pad)
    if pad:
        entry["padding"] = pad
    entry.update(bytes=path.stat().st_size, crc32=file_crc32(path))
    return entry, np.dtype(LITPKDS_DTYPES[code]).name


# ---------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------
def feistel_permute(pos: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 4) -> np.ndarray:
    """A pseudo-random bijection of [0, n), keyed by (seed, epoch), applied to the positions `pos`.

    Balanced Feistel network on 2h bits (4**h >= n) with splitmix64 round functions; values that land
    outside [0, n) are encrypted again (cycle walking), which keeps it a bijection of [0, n)."""
    h = max(1, math.ceil(max(n - 1, 1).bit_length() / 2))
    mask = np.uint64((1 << h) - 1)
    shift = np.uint64(h)
    keys = [np.uint64(rng.key(seed, epoch, r, SHUFFLE_STREAM)) for r in range(rounds)]
    x = np.asarray(pos, dtype=np.uint64).copy()
    todo = np.ones(x.shape, bool)
    while todo.any():
        y = x[todo]
        left, right = y >> shift, y & mask
        for k in keys:
            left, right = right, left ^ (rng.splitmix64(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x


class EpochCursor:
    """The (epoch, batch) position of an endless reader with `_len` batches per epoch on this rank: O(1)
    state and resume (the packed reader here, the SFT reader in `smdm.sft`).

    A pass (`iter`) starts at the position and ends after `epochs` epochs in all (counted from epoch 0, so a
    resumed reader ends where an uninterrupted one would) or never. Iterated in this process it moves the
    position along, and the next pass continues where it stopped; under DataLoader workers, worker w of W
    serves the pass's batches w, w + W, ... (each batch once) from a copy, so this object's position stays
    where it was and the next pass starts there again. To run passes through workers, `load_state_dict` each
    pass's start (e.g. {"epoch": e, "batch": 0}, with `epochs` = e + 1), or iterate one endless reader and
    checkpoint the position after the last batch used (each batch carries its `epoch` and `batch`; the packed
    reader's `state_after(batch)` turns them into a state)."""

    _len: int
    _epoch: int = 0
    _batch: int = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    def state_dict(self) -> dict:
        """Position of the next batch this object would serve (in-process iteration)."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, batch) in O(1); batch == len rolls to the next epoch."""
        e, b = int(state["epoch"]), int(state["batch"])
        if e < 0 or b < 0:
            raise ValueError(f"bad data position {state}")
        self._epoch, self._batch = divmod(e * self._len + b, self._len)

    def _serve(self, fetch, epochs: Optional[float]) -> Iterator[dict]:
        """fetch(epoch, batch) for every batch of a pass (class docstring), up to `epochs` epochs in all."""
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        g = self._epoch * self._len + self._batch + wid  # global batch counter over epochs
        end = None if epochs is None else int(epochs) * self._len
        while end is None or g < end:
            e, b = divmod(g, self._len)
            out = fetch(e, b)
            g += workers
            if info is None:
                self._epoch, self._batch = divmod(g, self._len)
            yield out


class _PackedDatasetImpl(EpochCursor):
    """Fixed windows over memory-mapped shards, as batches; see the module docstring and docs/CONTRACTS.md.

    Yields dicts: `input_ids` int64 (B, seq_len + extra_token), `segment_ids` int32 (same shape; 0-based,
    +1 at each document start inside the window), `index` int64 (B,) window ids, and the batch's
    position `epoch`, `batch` (ints) so a trainer using DataLoader workers can checkpoint
    `PackedDataset.state_after(batch)` without asking the workers.

    It yields whole batches: wrap it as `DataLoader(ds, batch_size=None, num_workers=W)` (the default
    batch_size=1 would stack them into (1, B, L)).
    """

    def __init__(
        self,
        path: PathLike,
        seq_len: int,
        batch_size: int,
        *,
        extra_token: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: Optional[int] = None,
        split: str = "train",
        verify: bool = True,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
        self.root = resolve_dataset(path, split)
        self.manifest = load_manifest(self.root)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.extra_token = bool(extra_token)
        self.window = self.seq_len + int(self.extra_token)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.epochs = bool(shuffle), epochs
        m = self.manifest
        # Header/size (and, with `verify`, CRC + id) checks now, so bad data fails before training starts.
        for s in m.shards:
            check_shard(m, s, full=verify)  # (a LITPKDS shard's checked token copy is dropped: mapped lazily)
        per_shard = [max(0, (s.num_tokens - int(self.extra_token)) // self.seq_len) for s in m.shards]
        self._cum = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self.num_windows = int(self._cum[-1])
        self._len = self.num_windows // (self.world_size * self.batch_size)
        if self._len == 0:
            raise ValueError(
                f"{self.root}: {self.num_windows} windows of {self.window} tokens cannot fill one batch of "
                f"{self.batch_size} on each of {self.world_size} ranks ({m.num_tokens} tokens"
                + (f"; windows never cross shard files, the largest holds {max(s.num_tokens for s in m.shards)}"
                   if len(m.shards) > 1 and self.window <= m.num_tokens else "") + ")"
            )
        self._epoch, self._batch = 0, 0
        self._maps: Optional[collections.OrderedDict] = None  # shard index -> (tokens, starts), see _shard

    # -- pickling for DataLoader workers: memory maps are reopened in each process
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_maps"] = None
        return d

    def state_after(self, batch: dict) -> dict:
        """The state that resumes right after a served batch (uses its `epoch`/`batch` fields)."""
        e, b = divmod(int(batch["epoch"]) * self._len + int(batch["batch"]) + 1, self._len)
        return {"epoch": e, "batch": b}

    # Memory maps kept open per process, least recently used first out: an imported lit-gpt directory can
    # hold 10^5 chunk files, more than the open-file limit, and random windows touch any of them.
    MAX_OPEN_SHARDS = 128

    def _shard(self, i: int) -> tuple:
        """(memory-mapped tokens, int64 document starts or None) of shard i, opened on first use.

        smdm shards map their document table. LITPKDS has none: a document starts after each EOS, so the
        segments of a window follow from the window itself (`_get_batch`) and no chunk is ever scanned."""
        if self._maps is None:
            self._maps = collections.OrderedDict()
        hit = self._maps.get(i)
        if hit is not None:
            self._maps.move_to_end(i)
            return hit
        m, s = self.manifest, self.manifest.shards[i]
        if m.format == "smdm":
            dt = np.dtype(m.dtype).newbyteorder("<")
            toks = np.memmap(s.path, dt, "r", SHARD_HEADER_LEN, (s.num_tokens,))
            table = SHARD_HEADER_LEN + (s.num_tokens * dt.itemsize + 7) // 8 * 8
            starts = np.memmap(s.path, "<u8", "r", table, (s.num_docs,)) if s.num_docs else np.zeros(0, "<u8")
            hit = (toks, np.asarray(starts, dtype=np.int64))
        else:
            code = _litpkds_header(s.path)[0]
            dt = np.dtype(LITPKDS_DTYPES[code]).newbyteorder("<")
            hit = (np.memmap(s.path, dt, "r", LITPKDS_HEADER_LEN, (s.num_tokens,)), None)
        self._maps[i] = hit
        if len(self._maps) > self.MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)  # the map closes when its last reference goes
        return hit

    def window_ids(self, epoch: int, batch: int) -> np.ndarray:
        """Window ids of batch `batch` of `epoch` on this rank (int64, (B,))."""
        per_rank = self._len * self.batch_size
        pos = self.rank * per_rank + batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        if not self.shuffle:
            return pos
        return feistel_permute(pos, self.num_windows, self.seed, epoch).astype(np.int64)

    def _get_batch(self, epoch: int, batch: int) -> dict:
        import torch

        ids = self.window_ids(epoch, batch)
        shard = np.searchsorted(self._cum, ids, side="right") - 1
        x = np.empty((ids.size, self.window), np.int64)
        seg = np.empty((ids.size, self.window), np.int32)
        for j, (w, i) in enumerate(zip(ids, shard)):
            toks, starts = self._shard(int(i))
            a = int(w - self._cum[i]) * self.seq_len
            x[j] = toks[a : a + self.window]
            # segment of position p = number of document starts in (a, p]
            if starts is None:  # LITPKDS: the starts in (a, p] are the EOS tokens in [a, p)
                seg[j, 0] = 0
                np.cumsum(x[j, :-1] == self.manifest.eos_id, out=seg[j, 1:])
            else:
                first = np.searchsorted(starts, a, side="right")
                seg[j] = np.searchsorted(starts, np.arange(a, a + self.window), side="right") - first
        return {
            "input_ids": torch.from_numpy(x),
            "segment_ids": torch.from_numpy(seg),
            "index": torch.from_numpy(ids),
            "epoch": int(epoch),
            "batch": int(batch),
        }

    def __iter__(self) -> Iterator[dict]:
        return self._serve(self._get_batch, self.epochs)


# torch is imported lazily (`smdm prepare` and `smdm data verify` never need it): the public class is
# built on first access to `smdm.data.PackedDataset`, as a subclass of torch's IterableDataset (so
# DataLoader treats it as iterable-style) and of `_PackedDatasetImpl` above.
_PACKED_DATASET = None


def __getattr__(name: str) -> Any:
    global _PACKED_DATASET
    if name == "PackedDataset":
        if _PACKED_DATASET is None:
            import torch.utils.data

            cls = type("PackedDataset", (_PackedDatasetImpl, torch.utils.data.IterableDataset), {})
            cls.__module__, cls.__qualname__ = __name__, "PackedDataset"
            cls.__doc__ = _PackedDatasetImpl.__doc__
            _PACKED_DATASET = cls
        return _PACKED_DATASET
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def documents(path: PathLike, split: str = "val") -> Iterator[np.ndarray]:
    """The documents of a dataset split, in shard order, each an int64 array of its tokens and its EOS.

    smdm shards: the shard's document table. LITPKDS (lit-gpt's chunks, `smdm data import`): a document
    starts after each EOS and at each file's start, as the reader cuts its segments, so a document split
    across two files is two documents. The EOS padding the manifest records (`padding`: `smdm prepare
    --format litpkds` and `smdm data import` say it apart) is no document, and neither is the padding
    lit-gpt's builder leaves after a chunk's last EOS (its sep token, BOS for the Llama tokenizer, repeated):
    a file's last segment that is one token repeated and has no EOS is left out. Every shard
    is checked against the manifest as it is read (`check_shard`: size, checksum, ids < vocab_size)."""
    m = load_manifest(resolve_dataset(path, split))
    for s in m.shards:
        toks = check_shard(m, s, full=True)  # the LITPKDS tokens; None for an smdm shard
        if m.format == "smdm":
            _, toks, starts = read_shard(s.path, verify=False)  # check_shard has verified it
        else:
            toks = toks[: toks.size - s.padding]  # the EOS padding the manifest records: no documents
            starts = np.concatenate([[0], np.flatnonzero(toks[:-1] == m.eos_id) + 1])
        edges = [int(a) for a in starts] + [int(toks.size)]
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            tail = toks[a:b]
            if m.format != "smdm" and k == len(edges) - 2 and b - a > 1 and tail[-1] != m.eos_id \
                    and bool((tail == tail[0]).all()):
                continue  # lit-gpt's sep padding after the chunk's last document
            if b > a:
                yield np.asarray(tail, dtype=np.int64)


def decode_sample(manifest: Manifest, n_tokens: int = 64) -> Optional[str]:
    """Decode the first tokens of the first shard with the dataset's tokenizer (None if unavailable)."""
    if not manifest.shards or manifest.tokenizer_path is None or not manifest.tokenizer_path.is_file():
        return None
    s = manifest.shards[0]
    if manifest.format == "smdm":
        toks = read_shard(s.path, verify=False)[1][:n_tokens]
    else:
        toks = read_litpkds(s.path)[2][:n_tokens]
    tok = load_tokenizer(manifest.tokenizer_path)
    return tok.decode([int(t) for t in toks], skip_special_tokens=False)
