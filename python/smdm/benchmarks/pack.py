"""`smdm bench pack`: packing throughput — the Rust core against its baselines, all in the same process.

    smdm bench pack [--tokens 16000000] [--mean-doc 512] [--vocab-size 32000] [--repeats 5] [--json FILE]

Packing = the documents' token ids (all concatenated, uint32, + each document's length) -> the shard stream
(each document followed by EOS, in the shard dtype: uint16 for vocab < 65536) + each document's start
offset. Windows need no copy (the reader slices the memory-mapped stream), so this is all of packing.

Variants (DESIGN §8 targets: >= 0.5x the numpy copy, >= 20x the Python loop):
- `rust`: `smdm._core.pack_documents` on uint32 ids (what a tokenizer returns): parallel one-pass copy with
  range check and narrowing to uint16, GIL released. `rust (uint16 input)`: the same on uint16 ids, so it
  reads and writes exactly the bytes of the numpy copy.
- `numpy copy (same bytes)`: `out = src.copy()` of a uint16 array the size of the packed stream: allocating
  and writing the output bytes once, the memory-bandwidth floor for any packer.
- `numpy vectorized`: `smdm.data.pack_documents_numpy` (the reference: boolean-mask scatter).
- `python loop (lit-gpt builder)`: one document at a time in the style of lit-gpt's
  `PackedDatasetBuilder.add_array` (np.append(doc, eos), copied into a fixed-size chunk buffer that is
  flushed when full), recording document starts.
All packers are checked to produce identical (stream, starts) before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from smdm.benchmarks import write_records
from smdm.cli import json_out, positive_int

BASELINES = ("numpy copy (same bytes)", "python loop (lit-gpt builder)", "numpy vectorized")


def make_documents(n_tokens: int, mean_doc: int, vocab_size: int, seed: int = 0):
    """(flat uint32 ids, uint64 lengths): geometric-ish lengths with the given mean, ids < vocab_size."""
    g = np.random.default_rng(seed)
    n_docs = max(1, n_tokens // mean_doc)
    lengths = g.exponential(mean_doc, n_docs).astype(np.uint64) + np.uint64(1)
    flat = g.integers(1, vocab_size, int(lengths.sum()), dtype=np.uint32)
    return flat, lengths


class LitGptStyleBuilder:
    """lit-gpt's PackedDatasetBuilder loop (chunks kept in memory instead of written to files)."""

    def __init__(self, chunk_size: int, sep_token: int, dtype):
        self._arr = np.full(chunk_size, sep_token, dtype)
        self._chunk_size, self._sep, self._idx = chunk_size, sep_token, 0
        self.chunks: list[np.ndarray] = []

    def _write_chunk(self):
        self.chunks.append(self._arr.copy())
        self._arr.fill(self._sep)
        self._idx = 0

    def add_array(self, arr: np.ndarray):
        while self._idx + arr.shape[0] > self._chunk_size:
            part_len = self._chunk_size - self._idx
            self._arr[self._idx : self._idx + part_len] = arr[:part_len]
            self._write_chunk()
            arr = arr[part_len:]
        self._arr[self._idx : self._idx + arr.shape[0]] = arr
        self._idx += arr.shape[0]

    def finish(self) -> np.ndarray:
        tail = self._arr[: self._idx].copy()
        return np.concatenate(self.chunks + [tail])


def pack_python_loop(flat: np.ndarray, lengths: np.ndarray, eos_id: int, vocab_size: int):
    from smdm.data import shard_dtype

    dt = shard_dtype(vocab_size)
    b = LitGptStyleBuilder(1 << 20, eos_id, dt)
    starts = np.empty(lengths.size, np.uint64)
    pos = i = 0
    for d, n in enumerate(lengths.tolist()):
        doc = flat[i : i + n]
        i += n
        starts[d] = pos
        b.add_array(np.append(doc, eos_id).astype(dt))
        pos += n + 1
    return b.finish(), starts


def _time(fn, repeats: int) -> float:
    """Best of `repeats` calls after a warm-up (the least disturbed by other processes)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def environment() -> dict:
    from smdm import __version__

    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "rayon_threads": int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1)),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "smdm": __version__,
    }


def _vocab(value: str) -> int:
    n = positive_int(value)
    if not 2 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"needs 2 <= ids < 2**32 (EOS is id 0), got {n}")
    return n


def run(n_tokens: int = 16_000_000, mean_doc: int = 512, vocab_size: int = 32000, repeats: int = 5) -> list:
    from smdm import _core
    from smdm.data import pack_documents_numpy, shard_dtype

    eos = 0
    flat, lengths = make_documents(n_tokens, mean_doc, vocab_size)
    out_len = flat.size + lengths.size
    # the copy baseline: random bytes of the packed stream's size and dtype (uint32 past 65536 ids)
    src = np.random.default_rng(1).integers(0, vocab_size, out_len, dtype=shard_dtype(vocab_size))
    flat16 = flat.astype(np.uint16) if vocab_size <= 65536 else flat
    variants = {
        "rust": lambda: _core.pack_documents(flat, lengths, eos, vocab_size),
        "rust (uint16 input)": lambda: _core.pack_documents(flat16, lengths, eos, vocab_size),
        "numpy copy (same bytes)": lambda: src.copy(),
        "numpy vectorized": lambda: pack_documents_numpy(flat, lengths, eos, vocab_size),
        "python loop (lit-gpt builder)": lambda: pack_python_loop(flat, lengths, eos, vocab_size),
    }
    want = variants["rust"]()
    for name in ("rust (uint16 input)", "numpy vectorized", "python loop (lit-gpt builder)"):
        got = variants[name]()
        if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
            raise AssertionError(f"{name} packs differently from rust")
    secs = {
        name: _time(fn, repeats if "python" not in name else max(1, repeats // 2))
        for name, fn in variants.items()
    }
    env = environment()
    records = []
    for name, sec in secs.items():
        records.append(
            {
                "bench": "pack",
                "variant": name,
                "tokens": int(out_len),
                "docs": int(lengths.size),
                "mean_doc": mean_doc,
                "vocab_size": vocab_size,
                "seconds": sec,
                "tokens_per_s": out_len / sec,
                "output_bytes_per_s": out_len * want[0].itemsize / sec,
                "ratio_vs": {base: secs[base] / sec for base in BASELINES},
                "environment": env,
            }
        )
    return records


def table(records) -> str:
    head = f"{'variant':<32} {'Mtok/s':>9} {'GB/s out':>9} {'x numpy copy':>13} {'x py loop':>10} "
    head += f"{'x np vec':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        x = r["ratio_vs"]
        lines.append(
            f"{r['variant']:<32} {r['tokens_per_s'] / 1e6:>9.1f} {r['output_bytes_per_s'] / 1e9:>9.2f} "
            f"{x['numpy copy (same bytes)']:>13.2f} {x['python loop (lit-gpt builder)']:>10.1f} "
            f"{x['numpy vectorized']:>9.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    records = run(args.tokens, args.mean_doc, args.vocab_size, args.repeats)
    r0 = records[0]
    env = r0["environment"]
    print(
        f"packing {r0['docs']:,} documents ({r0['tokens']:,} tokens incl. EOS, mean {args.mean_doc}) into "
        f"uint16; {env['cpu_count']} CPUs, rayon threads {env['rayon_threads']}, numpy {env['numpy']}"
    )
    print(table(records))
    rust = next(r for r in records if r["variant"] == "rust")["ratio_vs"]
    print(
        f"rust: {rust['numpy copy (same bytes)']:.2f}x the numpy copy (target >= 0.5x), "
        f"{rust['python loop (lit-gpt builder)']:.0f}x the Python loop (target >= 20x)"
    )
    if args.json:
        write_records(records, args.json)
    return 0


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `pack` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--tokens", type=positive_int, default=16_000_000, help="document tokens to pack")
    parser.add_argument("--mean-doc", type=positive_int, default=512, help="mean document length (exponential)")
    parser.add_argument("--vocab-size", type=_vocab, default=32000,
                        help="ids (EOS is 0, so at least 2; past 65536 the stream is uint32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per variant (best is kept)")
    parser.add_argument("--json", metavar="FILE", type=json_out, help="write one JSON record per variant")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.pack
    p = register(argparse.ArgumentParser(prog="smdm bench pack"))
    a = p.parse_args()
    sys.exit(a.func(a))
