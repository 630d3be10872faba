"""`smdm bench mask`: forward process (masking) throughput, the Rust core vs torch on CPU and numpy.

All variants run in the same process (DESIGN §8: target >= 3x the same math in torch, per token).

    smdm bench mask [--batch 8 16 32] [--seq-len 2048] [--json FILE]

The torch baseline is the identical counter-based generator written with int64 tensors (wrapping multiply,
masked logical shifts), so all three variants return identical arrays; the benchmark checks it before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

from smdm import rng
from smdm.benchmarks import write_records
from smdm.cli import json_out, positive_float, positive_int
from smdm.diffusion import crop_length, forward_process, forward_process_reference
from smdm.rng import Stream

# ---- the baseline: the same math in torch (CPU, int64 tensors) ----


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on int64 tensors holding uint64 bits (int64 add/multiply wrap modulo 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _uniform_torch(h: torch.Tensor) -> torch.Tensor:
    return _shr(h, 11).to(torch.float64) * 2.0**-53


def _keys_torch(seed: int, step: int, s: torch.Tensor, *tail: int) -> torch.Tensor:
    h = splitmix64_torch(torch.tensor(_i64(rng.key(seed, step))) ^ s)  # fold of (seed, step) is shared
    for w in tail:
        h = splitmix64_torch(h ^ w)
    return h


def forward_process_torch(tokens: torch.Tensor, *, seed: int, step: int, mask_id: int,
                          sample_offset: int = 0, eps: float = 1e-3, crop_prob: float = 0.01,
                          prompt_lens: torch.Tensor | None = None):
    """The forward process (i.i.d. t, docs/CONTRACTS.md) in plain torch ops; same outputs as the Rust core:
    (noisy, mask, t, p, weight, length)."""
    B, L = tokens.shape
    length = crop_length(seed, step, L, crop_prob)
    s = sample_offset + torch.arange(B, dtype=torch.int64)  # (B,)
    t = _uniform_torch(_keys_torch(seed, step, s, Stream.TIME, 0))  # (B,)
    p = (1 - eps) * t + eps  # (B,)
    j = torch.arange(length, dtype=torch.int64)  # (L',)
    u = _uniform_torch(splitmix64_torch(_keys_torch(seed, step, s, Stream.TOKEN)[:, None] ^ j))  # (B, L')
    mask = u < p[:, None]
    if prompt_lens is not None:
        mask &= j[None, :] >= prompt_lens[:, None]
    noisy = torch.where(mask, mask_id, tokens[:, :length])
    weight = torch.where(mask, (1.0 / p).to(torch.float32)[:, None], 0.0)
    return noisy, mask, t, p, weight, length


# ---- timing ----

BASELINES = ("torch", "torch (1 thread)", "numpy reference")


def _time(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    """Seconds per call: the best of `repeats` rounds of enough calls to last `min_time` (the minimum is
    the least disturbed by other processes on a shared machine; every variant gets the same rule)."""
    fn()  # warm-up
    n, t0 = 1, time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time / once))
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return min(rounds)


def _environment() -> dict:
    from smdm import __version__

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "rayon_threads": int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "smdm": __version__,
        "platform": platform.platform(),
    }


def one_thread(fn, *args, **kw):
    """torch's intra-op pool can be slower than one thread when the cores are shared: time both."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(n)


def _variants(x_np: np.ndarray, x_t: torch.Tensor, kw: dict) -> dict:
    """name -> zero-argument call. `rust` is the extension on numpy; the API row adds the torch wrapping."""
    from smdm import _core

    return {
        "rust": lambda: _core.forward_process(x_np, **kw),
        "rust (forward_process API, torch out)": lambda: forward_process(x_t, **kw),
        "torch": lambda: forward_process_torch(x_t, **kw),
        "torch (1 thread)": lambda: one_thread(forward_process_torch, x_t, **kw),
        "numpy reference": lambda: forward_process_reference(x_np, **kw),
    }


def run(batches, seq_len: int, *, mask_id: int = 32000, min_time: float = 0.2, check: bool = True):
    """Time every variant for each batch size; returns one record per (variant, batch)."""
    from smdm import _core

    env = _environment()
    records = []
    for B in batches:
        x_np = np.random.default_rng(0).integers(0, mask_id, size=(B, seq_len), dtype=np.int64)
        x_t = torch.from_numpy(x_np)
        kw = dict(seed=1234, step=5, mask_id=mask_id, crop_prob=0.0)
        variants = _variants(x_np, x_t, kw)
        if check:  # identical results before any timing
            want = _core.forward_process(x_np, **kw)
            got_t = forward_process_torch(x_t, **kw)
            got_r = forward_process_reference(x_np, **kw)
            for i in range(5):
                assert np.array_equal(np.asarray(got_t[i]), np.asarray(want[i])), "torch baseline differs"
                assert np.array_equal(np.asarray(got_r[i]), np.asarray(want[i])), "numpy reference differs"
        secs = {name: _time(fn, min_time) for name, fn in variants.items()}
        for name, sec in secs.items():
            records.append({
                "bench": "mask",
                "variant": name,
                "batch": B,
                "seq_len": seq_len,
                "tokens": B * seq_len,
                "seconds_per_call": sec,
                "tokens_per_s": B * seq_len / sec,
                "ratio_vs": {base: secs[base] / sec for base in BASELINES},
                "environment": env,
            })
    return records


def _table(records) -> str:
    head = (f"{'variant':<40} {'B':>4} {'L':>6} {'Mtok/s':>9} {'us/call':>9} {'x torch':>8} {'x torch1':>8} "
            f"{'x numpy':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        x = r["ratio_vs"]
        lines.append(f"{r['variant']:<40} {r['batch']:>4} {r['seq_len']:>6} {r['tokens_per_s'] / 1e6:>9.1f} "
                     f"{r['seconds_per_call'] * 1e6:>9.1f} {x['torch']:>8.2f} {x['torch (1 thread)']:>8.2f} "
                     f"{x['numpy reference']:>8.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    records = run(args.batch, args.seq_len, min_time=args.min_time)
    env = records[0]["environment"]
    print(f"forward process (masking), i.i.d. t, eps 1e-3; {env['cpu_count']} CPUs, torch {env['torch']} "
          f"({env['torch_threads']} threads), numpy {env['numpy']}")
    print(_table(records))
    rust = [r for r in records if r["variant"] == "rust"]
    worst = min(min(r["ratio_vs"]["torch"], r["ratio_vs"]["torch (1 thread)"]) for r in rust)
    print(f"rust vs the faster torch configuration: {worst:.1f}x at worst (target >= 3x per token)")
    if args.json:
        write_records(records, args.json)
    return 0


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `mask` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[8, 16, 32], help="batch sizes (rows)")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per row")
    parser.add_argument("--min-time", type=positive_float, default=0.2, help="seconds per timing round")
    parser.add_argument("--json", metavar="FILE", type=json_out, help="write one JSON record per (variant, batch)")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.mask
    p = register(argparse.ArgumentParser(prog="smdm bench mask"))
    a = p.parse_args()
    sys.exit(a.func(a))
