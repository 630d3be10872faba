# smdm bench sampler --config tiny --device cpu --gen-lengths 64 256 --batch-sizes 1 8 --json sampler.json
"""`smdm bench sampler`: generation throughput of each MDM sampler against the ARM twin with its static KV
cache, same config, same prompt and generation lengths, random weights, all in one process (DESIGN §8:
MDM >= 1.4x ARM tokens/s at 1.1B on GPU, the paper's claim).

    smdm bench sampler [--config tiny|demo|1028M] [--device cpu|cuda] [--gen-lengths 256 1024]
                       [--batch-sizes 1 8] [--steps-div 4] [--json FILE]

Reported per (variant, gen length, batch): generated tokens/s (generated tokens only, never the prompt),
forward passes (model calls), generated tokens per forward, and the ratio of tokens/s to the ARM twin in the
same run. MDM variants use steps = gen_length / steps-div. With random weights confidences are flat, so the
threshold sampler commits about one token per step (its worst case); trained models commit many more.
The ARM baseline runs with batch_invariant=False (its fastest form); the MDM variants use the default.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from smdm.benchmarks import write_records
from smdm.cli import json_out, positive_int
from smdm.config import ELBO_ESTIMATORS


def _variants(gen_length: int, steps_div: int) -> dict:
    """name -> generate() keyword arguments (None = the ARM twin)."""
    S = max(1, gen_length // steps_div)
    block = 32 if gen_length % 32 == 0 and (S % (gen_length // 32) == 0) else None
    v = {
        "arm kv-cache (baseline)": None,
        f"ancestral S={S}": dict(sampler="ancestral", steps=S),
        f"low_confidence S={S}": dict(sampler="low_confidence", steps=S),
        f"low_confidence S={S} cfg=1": dict(sampler="low_confidence", steps=S, cfg_scale=1.0),
    }
    if block:
        v[f"blocks {block} S={S}"] = dict(sampler="low_confidence", steps=S, block_length=block)
        v[f"blocks {block} S={S} prefix-cache"] = dict(sampler="low_confidence", steps=S, block_length=block,
                                                        cache="prefix")
        v[f"blocks {block} S={S} dual-cache"] = dict(sampler="low_confidence", steps=S, block_length=block,
                                                      cache="dual")
        v[f"threshold 0.9 blocks {block}"] = dict(sampler="threshold", threshold=0.9, block_length=block,
                                                  steps=S)
    return v


def _environment(device) -> dict:
    import numpy as np
    import torch

    from smdm import __version__
    from smdm.benchmarks import thread_counts

    env = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **thread_counts(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "smdm": __version__,
        "platform": platform.platform(),
        "device": str(device),
        "kernels": os.environ.get("SMDM_KERNELS", "auto"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run(config: str, device: str, gen_lengths, batch_sizes, *, prompt_length: int = 32, steps_div: int = 4,
        vocab_size: int = 32000, dtype: str = "float32", only=None, repeats: int = 1):
    """Time every variant once per (gen length, batch) after one warm-up call; returns one record each."""
    import torch

    from smdm.model import build_model, config_by_name
    from smdm.sampling import generate

    dev = torch.device(device)
    max_len = prompt_length + max(gen_lengths)
    dt = getattr(torch, dtype)
    models = {causal: build_model(config_by_name(config, vocab_size=vocab_size, causal=causal,
                                                 max_seq_len=max(max_len, 64)), seed=0).to(dev, dt).eval()
              for causal in (False, True)}
    env = _environment(dev)
    env.update(config=config, dtype=dtype, vocab_size=vocab_size, prompt_length=prompt_length)
    records = []
    for G in gen_lengths:
        for B in batch_sizes:
            g = torch.Generator().manual_seed(B * 100003 + G)
            prompts = torch.randint(0, vocab_size, (B, prompt_length), generator=g).tolist()
            results = {}
            for name, kw in _variants(G, steps_div).items():
                if only and kw is not None and not any(o in name for o in only):
                    continue
                model = models[kw is None]
                args = dict(gen_length=G, seed=list(range(B)))
                args.update(dict(cache="prefix", batch_invariant=False) if kw is None else kw)
                generate(model, prompts, **{**args, "gen_length": min(G, 8),
                                            "steps": min(args.get("steps", 8), 8),
                                            "block_length": None})  # warm-up
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                sec = float("inf")
                for _ in range(repeats):  # best of `repeats` (shared machines are noisy)
                    t0 = time.perf_counter()
                    out = generate(model, prompts, **args)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    sec = min(sec, time.perf_counter() - t0)
                results[name] = (out, sec)
            base = results.get("arm kv-cache (baseline)")
            for name, (out, sec) in results.items():
                tps = out.generated_tokens / sec
                records.append({
                    "bench": "sampler", "variant": name, "gen_length": G, "batch": B,
                    "generated_tokens": out.generated_tokens, "seconds": sec, "tokens_per_s": tps,
                    "forward_passes": out.forward_passes, "tokens_per_forward": out.tokens_per_forward,
                    "tokens_per_row_forward": out.generated_tokens / max(1, sum(out.row_forward_passes)),
                    "ratio_vs_arm": tps / (base[0].generated_tokens / base[1]) if base else None,
                    "environment": env,
                })
    return records


def cache_quality(model, prompts, references, gen_length: int, steps: int, block_length: int,
                  n_samples: int = 64, estimator: str = "time", **kw) -> list:
    """The block K/V caches' effect on output quality (both approximate for a bidirectional model): the same
    prompts generated with cache="none", "prefix" and "dual"; per variant the token agreement with the no-cache
    output, the MDM's own Monte Carlo ELBO of the generated text given the prompt (nats/token, lower = more
    likely under the model; `smdm.diffusion.elbo_nll` with `estimator`, recorded in every row), forward passes
    and seconds. `references` (the true continuations, or None) get the same ELBO as a yardstick."""
    import torch

    from smdm.benchmarks.frontier import paired_delta
    from smdm.diffusion import elbo_nll
    from smdm.sampling import generate

    def nll(conts):
        toks = torch.tensor([p + c for p, c in zip(prompts, conts)])
        e = elbo_nll(model, toks, prompt_lens=[len(p) for p in prompts], n_samples=n_samples, estimator=estimator)
        per_tok = e.nll / e.n_tokens
        return float(per_tok.mean()), float(per_tok.std() / max(1, len(prompts)) ** 0.5), per_tok.tolist()

    rows, base, base_nll = [], None, None
    for cache in ("none", "prefix", "dual"):
        t0 = time.perf_counter()
        out = generate(model, prompts, gen_length=gen_length, steps=steps, block_length=block_length,
                       cache=cache, **kw)
        sec = time.perf_counter() - t0
        gen = [s[len(p):] for s, p in zip(out.sequences, prompts)]
        base = gen if base is None else base
        same = sum(a == b for x, y in zip(gen, base) for a, b in zip(x, y)) / sum(len(x) for x in gen)
        mean, se, per = nll(gen)
        base_nll = per if base_nll is None else base_nll
        ref = None if references is None else sum(
            a == b for x, y in zip(gen, references) for a, b in zip(x, y)) / sum(len(x) for x in gen)
        # the same prompts, the same ELBO draws (seeded by row): paired, so the SE of the difference is not
        # the two sides' own SEs, which the prompts' spread dominates
        delta, delta_se = paired_delta(per, base_nll)
        rows.append({"cache": cache, "agreement_with_no_cache": same, "agreement_with_reference": ref,
                     "elbo_nats_per_token": mean, "elbo_se": se, "elbo_delta_vs_no_cache": delta,
                     "elbo_delta_se": delta_se, "elbo_estimator": estimator, "elbo_samples": n_samples,
                     "forward_passes": out.forward_passes, "seconds": sec, "outputs": gen})
    if references is not None:
        mean, se, _ = nll(references)
        rows.append({"cache": "reference text", "agreement_with_no_cache": sum(
            a == b for x, y in zip(references, base) for a, b in zip(x, y)) / sum(len(x) for x in references),
            "agreement_with_reference": 1.0, "elbo_nats_per_token": mean, "elbo_se": se,
            "elbo_estimator": estimator, "elbo_samples": n_samples, "forward_passes": None, "seconds": None})
    return rows


def validation_prompts(data_dir: str, n: int, prompt_length: int, gen_length: int):
    """The first n validation documents long enough: (prompts, true continuations). Either shard format."""
    from smdm.data import documents

    prompts, refs = [], []
    for doc in documents(data_dir, "val"):
        if len(prompts) == n:
            break
        if doc.size >= prompt_length + gen_length:
            prompts.append(doc[:prompt_length].tolist())
            refs.append(doc[prompt_length:prompt_length + gen_length].tolist())
    if not prompts:
        raise ValueError(f"{data_dir}: no validation document of {prompt_length + gen_length}+ tokens")
    return prompts, refs


def _table(records) -> str:
    head = f"{'variant':<36} {'gen':>5} {'B':>3} {'tok/s':>9} {'fwd':>6} {'tok/fwd':>8} {'x ARM':>6} {'s':>7}"
    # tok/fwd: generated tokens per forward pass per sequence (a batched call serves every row at once)
    lines = [head, "-" * len(head)]
    for r in records:
        ratio = f"{r['ratio_vs_arm']:.2f}" if r["ratio_vs_arm"] is not None else "-"
        lines.append(f"{r['variant']:<36} {r['gen_length']:>5} {r['batch']:>3} {r['tokens_per_s']:>9.1f} "
                     f"{r['forward_passes']:>6} {r['tokens_per_row_forward']:>8.2f} {ratio:>6} "
                     f"{r['seconds']:>7.2f}")
    return "\n".join(lines)


def quality_main(args) -> int:
    import smdm

    if args.quality_data is None:
        raise SystemExit("smdm bench sampler: error: --quality-ckpt needs --quality-data (the dataset whose val "
                         "documents give the prompts)")
    try:
        model, _ = smdm.load(args.quality_ckpt, device=args.device)
    except (OSError, ValueError) as e:  # CheckpointError (a ValueError) names the path and what is wrong
        raise SystemExit(f"smdm bench sampler: error: --quality-ckpt {args.quality_ckpt}: {e}") from None
    if model.config.causal:
        raise SystemExit(f"smdm bench sampler: error: --quality-ckpt {args.quality_ckpt} is an autoregressive "
                         f"checkpoint; the block caches are the MDM's")
    G = args.gen_lengths[0]
    block = args.quality_block
    err = "smdm bench sampler: error:"
    if G % block:  # said before anything runs (were tracebacks from generate, or a division by zero)
        raise SystemExit(f"{err} --quality-block {block} must divide the generation length {G} (--gen-lengths)")
    if not (math.isfinite(args.quality_temperature) and args.quality_temperature >= 0):
        raise SystemExit(f"{err} --quality-temperature must be finite and >= 0, got {args.quality_temperature}")
    if args.prompt_length + G > model.config.max_seq_len:
        raise SystemExit(f"{err} --prompt-length {args.prompt_length} + generation length {G} > the model's "
                         f"context of {model.config.max_seq_len}")
    try:
        prompts, refs = validation_prompts(args.quality_data, args.quality_n, args.prompt_length, G)
    except (ValueError, OSError) as e:
        raise SystemExit(f"{err} --quality-data: {e}") from None
    if len(prompts) < 2:
        raise SystemExit(f"{err} --quality-data {args.quality_data} has {len(prompts)} validation document(s) of "
                         f"{args.prompt_length + G}+ tokens: the paired standard errors need 2 or more")
    if len(prompts) < args.quality_n:
        print(f"note: {args.quality_data} has only {len(prompts)} validation documents of "
              f"{args.prompt_length + G}+ tokens: {len(prompts)} prompts (asked for {args.quality_n})",
              file=sys.stderr)
    S = max(1, G // args.steps_div)
    S -= S % (G // block)
    n_samples, estimator = args.quality_samples or 64, args.estimator or "time"  # (None: not given)
    rows = cache_quality(model, prompts, refs, G, max(S, G // block), block, n_samples=n_samples,
                         estimator=estimator, seed=list(range(len(prompts))),
                         temperature=args.quality_temperature)
    print(f"block-cache quality: {args.quality_ckpt}, {len(prompts)} validation prompts of "
          f"{args.prompt_length} tokens, gen {G}, blocks of {block}, {max(S, G // block)} steps, "
          f"T={args.quality_temperature}; ELBO = the model's Monte Carlo -log p(text | prompt), "
          f"{n_samples} samples, {estimator} estimator")
    print(f"{'output':<16} {'=nocache':>8} {'=ref':>6} {'ELBO nats/tok':>14} {'+-':>6} {'- nocache':>10} "
          f"{'+-':>7} {'fwd':>6} {'s':>7}")
    for r in rows:
        fwd = "-" if r["forward_passes"] is None else r["forward_passes"]
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        delta = (f"{r['elbo_delta_vs_no_cache']:>+10.4f} {r['elbo_delta_se']:>7.4f}"
                 if "elbo_delta_vs_no_cache" in r else f"{'-':>10} {'-':>7}")
        print(f"{r['cache']:<16} {r['agreement_with_no_cache']:>8.3f} {r['agreement_with_reference']:>6.3f} "
              f"{r['elbo_nats_per_token']:>14.3f} {r['elbo_se']:>6.3f} {delta} {fwd:>6} {sec:>7}")
    print("- nocache: the difference to the uncached output's ELBO, paired by prompt (+- its standard error)")
    if args.json:
        write_records(rows, args.json)
    return 0


def main(args: argparse.Namespace) -> int:
    from smdm.benchmarks import set_threads

    set_threads(args.threads)  # torch's and the Rust token choice's; the quality mode's generations and ELBOs too
    if args.quality_ckpt:
        return quality_main(args)
    quality_only = [f for f, v in (("--estimator", args.estimator), ("--quality-samples", args.quality_samples))
                    if v is not None]
    if quality_only:  # throughput runs compute no ELBO: an option that changes nothing is named, not ignored
        print(f"smdm bench sampler: error: {', '.join(quality_only)} applies to the quality mode "
              f"(--quality-ckpt) only", file=sys.stderr)
        return 2
    import torch

    from smdm.model import config_by_name

    for flag, check in (("--config", lambda: config_by_name(args.config)),
                        ("--device", lambda: torch.device(args.device))):
        try:  # said now, not as a traceback from building the model
            check()
        except (ValueError, RuntimeError) as e:
            print(f"smdm bench sampler: error: {flag}: {e}", file=sys.stderr)
            return 2
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print("smdm bench sampler: error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    wants_blocks = not args.only or any(o in "blocks prefix-cache dual-cache threshold" for o in args.only)
    for G in args.gen_lengths if wants_blocks else ():
        if not any(name.startswith("blocks") for name in _variants(G, args.steps_div)):
            print(f"note: gen length {G}: no block or cache variants (they use blocks of 32 with the steps split "
                  f"evenly: 32 must divide {G} and the blocks divide its {max(1, G // args.steps_div)} steps)",
                  file=sys.stderr)
    records = run(args.config, args.device, args.gen_lengths, args.batch_sizes,
                  prompt_length=args.prompt_length, steps_div=args.steps_div, vocab_size=args.vocab_size,
                  dtype=args.dtype, only=args.only, repeats=args.repeats)
    env = records[0]["environment"]
    print(f"sampler throughput, config {env['config']} ({env['dtype']}, vocab {env['vocab_size']}, random "
          f"weights), prompt {env['prompt_length']} tokens; device {env['device']}"
          f"{' ' + env['gpu'] if 'gpu' in env else ''}; {env['processor']}, {env['cpu_count']} CPUs, "
          f"torch {env['torch']} ({env['torch_threads']} threads, Rust {env['rust_threads']}), smdm {env['smdm']}")
    print(_table(records))
    print("tok/s counts generated tokens only; fwd = model calls; x ARM = tokens/s over the ARM twin with KV "
          "cache in the same run")
    if args.json:
        write_records(records, args.json)
    return 0


def at_least_2(value: str) -> int:
    n = positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a standard error needs two samples), got {n}")
    return n


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `sampler` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--config", default="tiny", help="model config name (tiny, demo, 170M, 1028M, ...)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--gen-lengths", type=positive_int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=positive_int, default=32)
    parser.add_argument("--steps-div", type=positive_int, default=4, help="MDM steps = gen length / this (default 4)")
    parser.add_argument("--vocab-size", type=positive_int, default=32000)
    parser.add_argument("--only", nargs="+", default=None, help="run only variants whose name contains one "
                        "of these (the ARM baseline is always run)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs per variant (best is kept)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of torch and of the Rust core (default: all)")
    parser.add_argument("--json", metavar="FILE", type=json_out, help="write one JSON record per (variant, gen, batch)")
    q = parser.add_argument_group("block-cache quality (instead of throughput)")
    q.add_argument("--quality-ckpt", metavar="DIR", help="trained MDM checkpoint: compare cache none/prefix/dual")
    q.add_argument("--quality-data", metavar="DIR", help="dataset whose val documents give the prompts")
    q.add_argument("--quality-n", type=at_least_2, default=32, help="prompts (default 32; >= 2, for the paired "
                   "standard errors)")
    q.add_argument("--quality-block", type=positive_int, default=8, help="block length (default 8)")
    q.add_argument("--quality-temperature", type=float, default=0.0)
    q.add_argument("--quality-samples", type=at_least_2, default=None, help="Monte Carlo samples of each ELBO "
                   "(default 64; >= 2, for its standard error)")
    q.add_argument("--estimator", choices=ELBO_ESTIMATORS, default=None, help="the ELBO's estimator: time "
                   "(1/t weights, the paper's; default) or count (LLaDA's, lower variance)")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.sampler
    p = register(argparse.ArgumentParser(prog="smdm bench sampler"))
    a = p.parse_args()
    sys.exit(a.func(a))
