"""`smdm bench pack|mask|tokenize|sampler|frontier|reversal|scaling|cfg`: benchmarks that print a table and
write JSON.

Each benchmark lives in `smdm.benchmarks.<name>` and exposes `register(parser)` (adds its options, sets
`func`). The module is imported only when its benchmark runs, so `smdm bench --help` stays fast and a
benchmark's heavy imports (torch, CUDA) never load for another one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

from smdm.cli import set_threads  # noqa: F401  (the benches' --threads; its home is the CLI)

BENCHMARKS = {
    "pack": "packing documents into a token stream (Rust vs numpy vs a lit-gpt style loop)",
    "mask": "the masking forward process (Rust vs torch on CPU)",
    "tokenize": "tokenize + pack (Rust pipeline vs Python tokenizers encode_batch + numpy)",
    "sampler": "MDM samplers vs the ARM twin (GPU kernels when available)",
    "frontier": "speed vs quality of MDM sampling and the ARM twin on trained checkpoints (judge perplexity)",
    "reversal": "the reversal curse: MDM vs its ARM twin on facts trained in one direction (CPU, minutes)",
    "scaling": "IsoFLOP sweep: MDM vs ARM validation loss over model sizes and compute budgets, power-law fits",
    "cfg": "unsupervised classifier-free guidance: MDM (and ARM twin) multiple-choice accuracy per weight",
}


def thread_counts() -> dict:
    """What a benchmark ran with: torch's threads and the Rust core's (rayon: RAYON_NUM_THREADS, else every CPU)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "rust_threads": int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)}


def _run(args: argparse.Namespace) -> int:
    """Import the chosen benchmark, parse its own options from the rest of the command line, run it."""
    module = importlib.import_module(f"smdm.benchmarks.{args.bench}")
    parser = argparse.ArgumentParser(prog=f"smdm bench {args.bench}")
    module.register(parser)
    inner = parser.parse_args(args.bench_args)
    return int(inner.func(inner) or 0)


def register(parser: argparse.ArgumentParser, name: str = "bench") -> None:
    sub = parser.add_subparsers(dest="bench", metavar="{" + ",".join(BENCHMARKS) + "}")
    for bench, help_text in BENCHMARKS.items():
        # No options at this level (prefix_chars no argument uses, add_help=False): every argument after
        # the benchmark's name, `--help` included, goes to the benchmark's own parser in `_run`.
        p = sub.add_parser(bench, help=help_text, add_help=False, prefix_chars="\x00")
        p.add_argument("bench_args", nargs="*")
        p.set_defaults(func=_run)


def write_records(records: list, path: str) -> None:
    """Write a benchmark's records (one per variant) as a JSON list with one record per line (compact even
    when records carry long token lists), atomically (`smdm.data.write_atomic`)."""
    from smdm.data import write_atomic

    write_atomic(path, ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode())
    print(f"wrote {len(records)} records to {path}")


def environment(**extra) -> dict:
    """What a benchmark record says about the machine: Python, torch, CPU count and threads, platform, the GPU
    (when CUDA is available), plus `extra`."""
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **extra}
