# smdm bench frontier --mdm runs/demo-mdm --arm runs/demo-ar --n 32 --gen-length 64 --json frontier.json
"""`smdm bench frontier`: speed against quality of MDM sampling and of the ARM twin with its KV cache, on
trained checkpoints.

The paper's claim that an MDM can generate faster than its ARM twin is a claim about a trade-off: fewer sampler
steps are faster and worse. This benchmark measures both sides of it on the same validation prompts in one
process:

- speed: generated tokens per second (generated tokens only, never the prompt) over whole `smdm.generate` calls,
  after one warm-up call per variant; forward passes (model calls);
- quality: the generative perplexity, exp of the judge's negative log-likelihood per generated token given the
  prompt (the judge is an autoregressive checkpoint, `--judge`, default the ARM twin: its exact likelihood,
  `smdm.evaluate.score`), with the standard error of the per-sample mean; and the mean unigram entropy of each
  sample's tokens (nats), which exposes repetitive text: a sample that repeats one token has entropy 0 and a
  deceptively good perplexity ("Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
  Inaccurate Categorical Sampling", Zheng et al., 2024, showed low-entropy samples scoring well this way).

The validation continuation of each prompt ("reference text") gets the same quality columns: the judge's
perplexity of real text and its entropy are the yardstick. A judge that is the ARM twin favours the ARM's own
samples (it scores its own distribution); an independent, larger ARM (`smdm convert from-litgpt`) is the fairer
judge. Generation is fixed-length (no stop at EOS), so every variant produces the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

from smdm.benchmarks import environment, write_records
from smdm.cli import json_out, positive_int


def sample_entropy(tokens) -> float:
    """Unigram entropy (nats) of one sample's tokens: -sum_v p_v log p_v with p_v the frequency of v in it."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


def quality(judge, prompts, continuations, *, batch_size: int = 16) -> dict:
    """The judge's NLL of each continuation given its prompt (exact, ARM) and each continuation's entropy."""
    import numpy as np

    from smdm.evaluate import score

    s = score(judge, list(zip(prompts, continuations)), batch_size=batch_size)
    per_token = s.nll / np.maximum(s.n_tokens, 1)  # (N,) nats per token of each sample
    ent = np.array([sample_entropy(c) for c in continuations])
    n = len(continuations)
    se = float(per_token.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    nats = float(s.nll.sum() / max(1, s.n_tokens.sum()))  # token-weighted: all samples are gen_length long
    return {"judge_nats_per_token": nats, "judge_nats_se": se, "gen_ppl": math.exp(nats),
            "entropy": float(ent.mean()), "entropy_min": float(ent.min()),
            "judge_nats_per_sample": [float(x) for x in per_token]}


def paired_delta(a, b) -> tuple:
    """Mean and standard error of the per-sample differences a - b (the same prompts: a paired comparison,
    whose SE is far below either side's own when the two mostly agree)."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def add_cache_deltas(records: list) -> None:
    """Each cached MDM variant's judge NLL minus that of the same variant without a cache, paired by prompt."""
    def key(r):
        return tuple((k, r.get(k)) for k in ("sampler", "steps", "block_length", "threshold", "cfg_scale"))

    plain = {key(r): r for r in records if r.get("cache") == "none" and "sampler" in r}
    for r in records:
        base = plain.get(key(r)) if r.get("cache") not in (None, "none") and "sampler" in r else None
        if base is not None:
            d, se = paired_delta(r["judge_nats_per_sample"], base["judge_nats_per_sample"])
            r["judge_nats_delta_vs_no_cache"], r["judge_nats_delta_se"] = d, se


def timed_generate(model, prompts, *, seeds, batch_size: int, device, **kw) -> dict:
    """Every prompt generated in batches of `batch_size` after one warm-up call of the first batch's shape
    (whose output is discarded); seconds over the timed calls only, GPU synchronized."""
    import torch

    from smdm.sampling import generate

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    generate(model, [prompts[i] for i in batches[0]], seed=[seeds[i] for i in batches[0]], **kw)  # warm-up
    sync()
    outs, fwd, gen_tokens = [], 0, 0
    t0 = time.perf_counter()
    for b in batches:
        o = generate(model, [prompts[i] for i in b], seed=[seeds[i] for i in b], **kw)
        outs += [s[len(prompts[i]):] for s, i in zip(o.sequences, b)]
        fwd += o.forward_passes
        gen_tokens += o.generated_tokens
    sync()
    sec = time.perf_counter() - t0
    return {"continuations": outs, "seconds": sec, "forward_passes": fwd, "generated_tokens": gen_tokens,
            "tokens_per_s": gen_tokens / sec}


def cache_spec(text: str) -> tuple:
    """`--cache` value: "none" | "prefix" | "dual", optionally ":N" (the kept K/V rebuilt every N forward
    passes in a block: `generate(cache_refresh=N)`) -> (cache, refresh or None)."""
    cache, sep, n = text.partition(":")
    if cache not in ("none", "prefix", "dual") or (sep and (not n.isdigit() or cache == "none")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected none, prefix, dual, prefix:N or dual:N")
    if n and int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the refresh interval N must be >= 1")
    return cache, int(n) if n else None


def variants(steps, samplers, block_length=None, caches=("none",), threshold: float = 0.9) -> dict:
    """name -> generate() keyword arguments of each MDM variant (the ARM baseline is added by `run`): every
    sampler x step count x cache ("none" | "prefix" | "dual", or a (cache, refresh) pair of `cache_spec`)."""
    out = {}
    for sampler in samplers:
        for S in steps:
            for spec in caches:
                cache, refresh = (spec, None) if isinstance(spec, str) else spec
                name = f"mdm {sampler}" + (f" {threshold}" if sampler == "threshold" else "") + f" S={S}"
                name += (f" blocks {block_length}" if block_length else "") + (
                    f" {cache}-cache" if cache != "none" else "") + (f" refresh {refresh}" if refresh else "")
                if name in out:  # "dual:4 dual:04", "8 8": one would silently replace the other
                    raise ValueError(f"{name}: given twice")
                out[name] = dict(sampler=sampler, steps=S, block_length=block_length, cache=cache,
                                 threshold=threshold if sampler == "threshold" else None, cache_refresh=refresh)
    return out


def check_variants(gen_length: int, steps, samplers, block_length=None, caches=("none",), threshold: float = 0.9,
                   cfg_scale: float = 0.0) -> dict:
    """`variants` with cfg_scale, every one checked as `generate` would check it (ValueError naming the variant), so
    a bad option fails before the first variant (the ARM baseline) runs."""
    from smdm.sampling import check_mdm_options

    out = {name: dict(kw, cfg_scale=cfg_scale)
           for name, kw in variants(steps, samplers, block_length, caches, threshold).items()}
    for name, kw in out.items():
        try:
            check_mdm_options(gen_length, **kw)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def run(mdm, arm, judge, prompts, references, *, gen_length: int, steps, samplers, temperature: float,
        block_length=None, caches=("none",), threshold: float = 0.9, cfg_scale: float = 0.0,
        batch_size: int = 8, seed: int = 0, judge_batch_size: int = 16) -> list:
    """One record per variant (ARM twin first when given, then each MDM sampler x steps, then the reference
    text): speed, forward passes, judge perplexity and entropy, tokens/s over the ARM's."""
    import torch

    device = next(mdm.parameters()).device
    seeds = [seed + i for i in range(len(prompts))]
    common = dict(gen_length=gen_length, temperature=temperature, seeds=seeds, batch_size=batch_size,
                  device=device)
    plan = []
    if arm is not None:
        plan.append(("arm kv-cache", arm, dict(cache="prefix", batch_invariant=False)))
    mdm_variants = check_variants(gen_length, steps, samplers, block_length, caches, threshold, cfg_scale)
    plan += [(name, mdm, kw) for name, kw in mdm_variants.items()]
    records = []
    with torch.no_grad():
        for name, model, kw in plan:
            r = timed_generate(model, prompts, **common, **kw)
            q = quality(judge, prompts, r["continuations"], batch_size=judge_batch_size)
            records.append({"variant": name, **{k: v for k, v in kw.items() if v is not None},
                            **{k: v for k, v in r.items() if k != "continuations"}, **q,
                            "samples": r["continuations"]})
            print(f"  {name}: {r['tokens_per_s']:.1f} tok/s, gen PPL {q['gen_ppl']:.2f}, entropy "
                  f"{q['entropy']:.2f}", file=sys.stderr, flush=True)
        q = quality(judge, prompts, references, batch_size=judge_batch_size)
    records.append({"variant": "reference text", **q, "samples": references})
    base = records[0]["tokens_per_s"] if arm is not None else None
    for r in records:
        r["ratio_vs_arm"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    add_cache_deltas(records)
    return records


def table(records) -> str:
    w = max(len("variant"), *(len(r["variant"]) for r in records))
    head = (f"{'variant':<{w}} {'tok/s':>8} {'x ARM':>6} {'fwd':>6} {'gen PPL':>8} {'nats/tok':>8} {'+-':>5} "
            f"{'entropy':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        ratio = f"{r['ratio_vs_arm']:.2f}" if r.get("ratio_vs_arm") is not None else "-"
        fwd = r.get("forward_passes", "-")
        lines.append(f"{r['variant']:<{w}} {tps:>8} {ratio:>6} {fwd:>6} {r['gen_ppl']:>8.2f} "
                     f"{r['judge_nats_per_token']:>8.3f} {r['judge_nats_se']:>5.3f} {r['entropy']:>7.2f}")
    for r in records:
        if "judge_nats_delta_vs_no_cache" in r:
            lines.append(f"{r['variant']}: nats/tok minus the same variant without a cache, paired by prompt: "
                         f"{r['judge_nats_delta_vs_no_cache']:+.4f} ± {r['judge_nats_delta_se']:.4f}")
    return "\n".join(lines)


def _tokenizer_digest(step_dir: Path) -> str | None:
    """The sha256 of the checkpoint's tokenizer.json as its manifest records it (`smdm.load` has just checked
    the file against it), or None without a tokenizer."""
    from smdm.checkpoint import MANIFEST

    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    return files.get("tokenizer.json", {}).get("sha256")


def _load(flag: str, path: str, device, dtype, prog: str = "smdm bench frontier"):
    """(model, tokenizer, tokenizer digest, step dir) of a checkpoint, errors naming the flag."""
    import torch

    from smdm.checkpoint import load, resolve

    try:
        step = resolve(path)
        model, tok = load(step, device=device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{prog}: error: {flag} {path}: {e}") from None
    return model.to(getattr(torch, dtype)), tok, _tokenizer_digest(step), step


def load_twin(flag: str, path: str, mdm, digest, device, dtype, prog: str = "smdm bench frontier"):
    """An autoregressive checkpoint that reads the MDM's token ids (same vocabulary and tokenizer.json), or a
    SystemExit naming the flag."""
    m, _, d, _ = _load(flag, path, device, dtype, prog)
    if not m.config.causal:
        raise SystemExit(f"{prog}: error: {flag} {path} is an MDM; it must be autoregressive")
    if m.config.vocab_size != mdm.config.vocab_size or d != digest:
        raise SystemExit(f"{prog}: error: {flag} {path}: its tokenizer differs from --mdm's "
                         f"(vocab {m.config.vocab_size} vs {mdm.config.vocab_size}, tokenizer.json sha256 "
                         f"{(d or 'none')[:12]} vs {(digest or 'none')[:12]}); it must read the MDM's "
                         f"token ids")
    return m


def _default_data(step_dir: Path, prog: str = "smdm bench frontier") -> str:
    """The dataset the MDM was trained on (its config's train.data), else the built-in corpus (`runs/data`).
    Either is recorded as given to `smdm train`, so a relative path means the directory it ran in: one that
    is not here is an error asking for --data (not one blaming an option the user did not give)."""
    from smdm.checkpoint import read_config
    from smdm.train import DEMO_DATA

    conf = read_config(step_dir)
    recorded = conf.get("train", {}).get("data")
    if recorded is None and "sft" in conf:  # fine-tuned on JSONL (--sft takes no --data): no dataset to default to
        raise SystemExit(f"{prog}: error: {step_dir} was fine-tuned (--sft) and records no dataset: give --data DIR")
    data = recorded or str(DEMO_DATA)
    if not Path(data).exists():
        what = f"its training data {data}" if recorded else f"the built-in corpus it was trained on ({data})"
        raise SystemExit(f"{prog}: error: no --data given, and {what} is not here (a relative path is relative to "
                         f"where `smdm train` ran): give --data DIR, a prepared dataset with its tokenizer")
    return data


def main(args: argparse.Namespace) -> int:
    import torch

    from smdm.benchmarks import set_threads

    set_threads(args.threads)  # torch's and the Rust sampler's
    if args.n < 1:
        raise SystemExit(f"smdm bench frontier: error: --n must be >= 1, got {args.n}")
    if args.arm is None and args.judge is None:
        raise SystemExit("smdm bench frontier: error: give --arm (the ARM twin, also the default judge) or "
                         "--judge (an autoregressive checkpoint that scores the samples)")
    steps = sorted({max(1, args.gen_length // d) for d in (8, 4, 2, 1)}) if args.steps is None else args.steps
    try:  # before any checkpoint loads or any variant runs
        check_variants(args.gen_length, steps, args.samplers, args.block_length, args.cache, args.threshold,
                       args.cfg_scale)
    except ValueError as e:
        raise SystemExit(f"smdm bench frontier: error: {e}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mdm, tok, digest, mdm_step = _load("--mdm", args.mdm, device, args.dtype)
    if mdm.config.causal:
        raise SystemExit(f"smdm bench frontier: error: --mdm {args.mdm} is an autoregressive checkpoint")
    loaded = {}
    for flag, path in (("--arm", args.arm), ("--judge", args.judge or args.arm)):
        if path is None:
            loaded[flag] = None
            continue
        loaded[flag] = load_twin(flag, path, mdm, digest, device, args.dtype)
    data = args.data or _default_data(mdm_step)
    prompts, refs = _validation(data, args)
    print(f"speed-quality frontier: MDM {args.mdm}, ARM {args.arm}, judge {args.judge or args.arm}; "
          f"{len(prompts)} validation prompts of {args.prompt_length} tokens from {data}, {args.gen_length} "
          f"new tokens each, temperature {args.temperature}, batch {args.batch_size}; device {device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads", flush=True)
    try:
        records = run(mdm, loaded["--arm"], loaded["--judge"], prompts, refs, gen_length=args.gen_length,
                      steps=steps, samplers=args.samplers, temperature=args.temperature,
                      block_length=args.block_length, caches=args.cache, threshold=args.threshold,
                      cfg_scale=args.cfg_scale, batch_size=args.batch_size, seed=args.seed)
    except ValueError as e:  # generate()'s checks: steps vs blocks, sampler names, lengths past the context
        raise SystemExit(f"smdm bench frontier: error: {e}") from None
    print(table(records))
    print("tok/s: generated tokens only; x ARM: over the ARM twin with KV cache in this run; fwd: model calls; "
          "gen PPL = exp(nats/tok), the judge's NLL per generated token given the prompt (+- its standard "
          "error over samples); entropy: mean unigram entropy of a sample's tokens (low = repetitive)")
    if tok is not None:
        for r in records:
            r["text"] = [tok.decode(s) for s in r["samples"][:args.show]]
        for r in records:
            for t in r["text"]:
                print(f"[{r['variant']}] {t!r}")
    if args.json:
        env = environment(device=str(device), dtype=args.dtype, mdm=args.mdm, arm=args.arm,
                          judge=args.judge or args.arm, data=str(data), prompt_length=args.prompt_length,
                          gen_length=args.gen_length, n=len(prompts), temperature=args.temperature,
                          schedule=getattr(mdm, "train_schedule", None) or "linear")  # generate()'s default
        write_records([{**r, "environment": env} for r in records], args.json)
    return 0


def _validation(data: str, args):
    from smdm.benchmarks.sampler import validation_prompts

    try:
        prompts, refs = validation_prompts(data, args.n, args.prompt_length, args.gen_length)
    except (OSError, ValueError) as e:
        raise SystemExit(f"smdm bench frontier: error: --data {data}: {e}") from None
    if len(prompts) < args.n:
        print(f"note: {data} has only {len(prompts)} validation documents of "
              f"{args.prompt_length + args.gen_length}+ tokens (asked for {args.n})", file=sys.stderr)
    return prompts, refs


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `frontier` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--mdm", required=True, metavar="DIR", help="the MDM checkpoint (run or step dir)")
    parser.add_argument("--arm", metavar="DIR", help="its ARM twin: the speed baseline and the default judge")
    parser.add_argument("--judge", metavar="DIR", help="autoregressive checkpoint that scores every sample "
                        "(default --arm; same tokenizer)")
    parser.add_argument("--data", metavar="DIR", help="dataset whose val documents give the prompts and the "
                        "reference text (default: the MDM's training data, else the built-in corpus)")
    parser.add_argument("--n", type=int, default=32, help="prompts (default 32)")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="MDM sampler steps (default gen/8 gen/4 gen/2 gen)")
    parser.add_argument("--samplers", nargs="+", default=["ancestral", "low_confidence"],
                        help="MDM samplers: ancestral low_confidence threshold (default the first two)")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the threshold "
                        "sampler (default 0.9)")
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks (MDM)")
    parser.add_argument("--cache", nargs="+", default=[("none", None)], type=cache_spec,
                        help="MDM K/V caches, each a variant: none prefix dual (the last two approximate; they "
                        "need --block-length to gain much; default none); prefix:N / dual:N rebuild the kept "
                        "K/V every N forward passes in a block")
    parser.add_argument("--temperature", type=float, default=1.0, help="every variant (default 1: sampling)")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised CFG weight of the MDM")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and of the Rust core (default: all)")
    parser.add_argument("--show", type=int, default=2, help="decoded samples printed per variant")
    parser.add_argument("--json", metavar="FILE", type=json_out,
                        help="write one JSON record per variant (samples included)")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.frontier
    p = register(argparse.ArgumentParser(prog="smdm bench frontier"))
    a = p.parse_args()
    sys.exit(a.func(a))
