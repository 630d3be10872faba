"""`smdm bench tokenize`: the tokenize + pack pipeline, Rust against Python `tokenizers` + numpy.

    smdm bench tokenize [--mb 8] [--tokenizer tokenizer.json | --vocab-size 8192] [--threads N] [--json FILE]

Input: the first ~`--mb` MB of the built-in corpus (the stdlib's `.py` files, whole files as documents).
Output of every variant: the packed stream (ids + EOS per document, uint16/uint32 by vocabulary) and the
document starts; all variants are checked identical before timing.

Variants:
- `rust`: `smdm._core.Tokenizer.encode_pack` (smdm's byte-level BPE fast path, rayon, GIL released).
- `rust (crate encode)`: the same call with SMDM_REFERENCE=1: the `tokenizers` crate's own `encode_fast`
  per document in parallel (what the fast path replaces).
- `python tokenizers + numpy` (the DESIGN §8 baseline, target >= 1.5x): `Tokenizer.encode_batch(texts,
  add_special_tokens=False)` (parallel in Rust inside the package) + appending EOS and concatenating in numpy.
- `rust (one document)`: `rust` on the same texts joined by newlines into one document (what a large .txt
  input is), checked equal to the crate's encode of that document; its ratios compare MB/s with the rows
  above. A document is cut into segments inside (tokenize.rs), so it scales with cores too.
Scaling with cores: both sides use rayon pools sized when first used; `--threads N` sets RAYON_NUM_THREADS
(ours) and RAYON_RS_NUM_THREADS (the package's) before any work, so run once with `--threads 1` and once
with the default to compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from smdm.benchmarks import write_records
from smdm.cli import json_out, positive_float, positive_int

BASELINE = "python tokenizers + numpy"
ONE_DOC = "rust (one document)"


def corpus_texts(mb: float) -> list[str]:
    """The first ~mb MB of the built-in corpus, in its stable order."""
    from smdm.corpus import builtin_docs

    texts, size = [], 0
    for d in builtin_docs():
        if not d.text:
            continue
        texts.append(d.text)
        size += len(d.text)
        if size >= mb * 1e6:
            break
    return texts


def python_pipeline(tok, texts: list[str], eos: int, vocab_size: int):
    """HF tokenizers encode_batch + numpy: the stream and document starts."""
    from smdm.data import shard_dtype

    encs = tok.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), np.uint64, len(encs))
    stream = np.concatenate([np.array(e.ids + [eos], shard_dtype(vocab_size)) for e in encs])
    starts = np.zeros(lengths.size, np.uint64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return stream, starts


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (caches, thread pools)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _with_env(name: str, value: str, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def run(mb: float = 8.0, tokenizer: str | None = None, vocab_size: int = 8192, repeats: int = 3) -> list:
    import tempfile

    import tokenizers

    from smdm import __version__, _core
    from smdm.data import load_tokenizer

    texts = corpus_texts(mb)
    if tokenizer is None:  # train one on the first MB (not timed)
        tok = _core.Tokenizer.train_bpe(corpus_texts(1.0), vocab_size)
        with tempfile.TemporaryDirectory(prefix="smdm-bench-tokenize-") as tmp:  # removed once both have read it
            path = os.path.join(tmp, "tokenizer.json")
            with open(path, "w") as f:
                f.write(tok.to_json())
            rust = _core.Tokenizer.from_file(path)
            py = load_tokenizer(path, as_data=True)  # encodes as prepare does
    else:
        try:
            rust = _core.Tokenizer.from_file(tokenizer)
        except (OSError, ValueError) as e:  # SmdmIOError / SmdmFormatError, naming the file
            raise SystemExit(f"smdm bench tokenize: error: --tokenizer {e}") from None
        py = load_tokenizer(tokenizer, as_data=True)
    eos, vocab = rust.eos_id, rust.vocab_size
    variants = {
        "rust": lambda: rust.encode_pack(texts),
        "rust (crate encode)": lambda: _with_env("SMDM_REFERENCE", "1", lambda: rust.encode_pack(texts)),
        BASELINE: lambda: python_pipeline(py, texts, eos, vocab),
    }
    want = variants["rust"]()
    for name, fn in variants.items():
        got = fn()
        if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
            raise AssertionError(f"{name} produces different tokens than rust")
    one = ["\n".join(texts)]
    want_one = _with_env("SMDM_REFERENCE", "1", lambda: rust.encode_pack(one))
    variants[ONE_DOC] = lambda: rust.encode_pack(one)
    if not np.array_equal(variants[ONE_DOC]()[0], want_one[0]):
        raise AssertionError(f"{ONE_DOC} produces different tokens than the crate's encode")
    secs = {name: _time(fn, repeats) for name, fn in variants.items()}
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    sizes = {name: (len(texts), n_bytes, int(want[0].size)) for name in variants}
    sizes[ONE_DOC] = (1, n_bytes + len(texts) - 1, int(want_one[0].size))
    mb_s = {name: sizes[name][1] / sec / 1e6 for name, sec in secs.items()}
    env = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS"),
        "RAYON_RS_NUM_THREADS": os.environ.get("RAYON_RS_NUM_THREADS"),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "smdm": __version__,
    }
    return [
        {
            "bench": "tokenize",
            "variant": name,
            "documents": sizes[name][0],
            "bytes": sizes[name][1],
            "tokens": sizes[name][2],
            "vocab_size": vocab,
            "seconds": sec,
            "mb_per_s": mb_s[name],
            "tokens_per_s": sizes[name][2] / sec,
            "ratio_vs": {
                BASELINE: mb_s[name] / mb_s[BASELINE],
                "rust (crate encode)": mb_s[name] / mb_s["rust (crate encode)"],
            },
            "environment": env,
        }
        for name, sec in secs.items()
    ]


def table(records) -> str:
    head = f"{'variant':<28} {'MB/s':>8} {'Mtok/s':>8} {'x python':>9} {'x crate':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        x = r["ratio_vs"]
        lines.append(
            f"{r['variant']:<28} {r['mb_per_s']:>8.2f} {r['tokens_per_s'] / 1e6:>8.2f} {x[BASELINE]:>9.2f} "
            f"{x['rust (crate encode)']:>8.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.threads:  # before any rayon pool exists (ours and the tokenizers package's)
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_THREADS"] = str(args.threads)
    records = run(args.mb, args.tokenizer, args.vocab_size, args.repeats)
    r0 = records[0]
    env = r0["environment"]
    print(
        f"tokenize + pack {r0['documents']} documents ({r0['bytes'] / 1e6:.1f} MB, {r0['tokens']:,} tokens, "
        f"vocab {r0['vocab_size']}); {env['cpu_count']} CPUs, threads {args.threads or 'all'}, "
        f"tokenizers {env['tokenizers']}"
    )
    print(table(records))
    x = next(r for r in records if r["variant"] == "rust")["ratio_vs"][BASELINE]
    print(f"rust: {x:.2f}x Python tokenizers encode_batch + numpy (target >= 1.5x)")
    if args.json:
        write_records(records, args.json)
    return 0


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `tokenize` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--mb", type=positive_float, default=8.0, help="MB of the built-in corpus to tokenize")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: train a BPE on the first MB)")
    parser.add_argument("--vocab-size", type=positive_int, default=8192, help="vocabulary of the trained tokenizer")
    parser.add_argument("--threads", type=positive_int, help="rayon threads for both sides (default: all cores)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per variant (best is kept)")
    parser.add_argument("--json", metavar="FILE", type=json_out, help="write one JSON record per variant")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.tokenize
    p = register(argparse.ArgumentParser(prog="smdm bench tokenize"))
    a = p.parse_args()
    sys.exit(a.func(a))
