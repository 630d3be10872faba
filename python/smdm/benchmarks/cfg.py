# smdm bench cfg --mdm runs/demo-mdm --arm runs/demo-ar --n 200 --cfg 0 0.5 1 2 4 --json cfg.json
"""`smdm bench cfg`: does unsupervised classifier-free guidance help the MDM choose, and would the same contrast
help its ARM twin? Multiple choice on held-out text, every guidance weight in one process.

The paper (Nie et al., 2024, Eq. 7) guides the MDM with its own unconditional prediction, no extra training: the
logits u + (w + 1)(c - u), c given the prompt, u with every prompt position masked; it reports higher zero-shot
accuracy with it. Here each item is a validation document cut at a random point: `--context` tokens, then the
`--choice` tokens that really follow (the answer) among `--distractors` spans of the same length taken at random
from other validation documents, in a random order. A model picks the choice with the lowest score (-log p of
the choice given the context, `smdm.evaluate.score`; the MDM's by its Monte Carlo ELBO or, `--method chain`,
exactly by the chain rule; with guidance w). `--mc FILE` takes the questions of a multiple-choice JSONL file
instead (`smdm eval mc`'s format, tokenization and scores; choices of any number and length, so acc_norm too).

Fairness: guidance is a contrast with an unconditional model, and an ARM has one too. With `--arm`, the ARM
twin is scored exactly (w = 0) and with the same contrast per token, u + (w + 1)(c - u) where u are its logits
after a lone EOS instead of the context (classifier-free guidance for language models, Sanchez et al., 2023),
so a gain that any model gets from discounting generic text is not credited to diffusion. Every row reports
accuracy with its standard error and the paired difference to the same model at w = 0 (the same items: the
standard error of the per-item differences). When the split has fewer long documents than items, a document
gives several non-overlapping windows; items of one document are not independent, so the standard errors are
clustered by document.

What the held-out items can show: with `--distractors-from other` (the default) the distractors are draws of
the text's unconditional distribution and the answer a draw given the context, so the best rule ranks choices by
p(x | context) / p(x), which the contrast approaches as w grows (it is that limit only for one-token choices:
each position's guided distribution is normalised on its own): accuracy rising with w is expected of any model with a
good unconditional distribution, the ARM as much as the MDM. `--distractors-from same` takes them from the
item's own document instead (on topic, likely without the context too); `--mc` runs a real benchmark, where
the paper's claim is made.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from smdm.benchmarks import environment, write_records
from smdm.cli import json_out, positive_int
from smdm.config import ELBO_ESTIMATORS

N_SAMPLES = 32  # --n-samples default: Monte Carlo samples of each ELBO


@dataclass(eq=False)
class Items:
    """N multiple-choice items over token ids: contexts (N lists), choices (N lists of token-id lists; items
    may differ in their number of choices), labels (N,) the index of the right choice, where: held-out items
    (N, 2) document index and cut offset, `--mc` items (N, 1) line numbers; chars (N lists, `--mc` only) the
    characters of each choice, for lm-eval's acc_norm; groups (N,) the document of each held-out item: items of
    one document are not independent, so standard errors are clustered by it (None: every item alone)."""

    contexts: list
    choices: list
    labels: np.ndarray
    where: np.ndarray
    chars: Optional[list] = None
    groups: Optional[np.ndarray] = None


def _cuts(g, d_len: int, need: int, n: int, tries: int = 32) -> list:
    """Up to n start offsets of non-overlapping `need`-token windows in a document of d_len tokens, each
    drawn uniformly and kept when it overlaps no earlier one (`tries` draws per window)."""
    cuts = []
    for _ in range(n):
        for _ in range(tries):
            c = int(g.integers(0, d_len - need + 1))
            if all(c + need <= a or a + need <= c for a in cuts):
                cuts.append(c)
                break
        else:
            break
    return cuts


SOURCES = ("other", "same")  # where the distractors come from: other documents, or the item's own document


def make_items(docs: list, n: int, context: int, choice: int, distractors: int, seed: int = 0,
               source: str = "other") -> Items:
    """Up to `n` items from `docs` (token-id arrays): windows of context + choice tokens at random offsets of
    the documents long enough, spread evenly: the documents in a random order, each giving its first window,
    then each its second, ..., up to ceil(n / documents) non-overlapping windows per document (one per
    document when there are enough). Each item's distractors are `choice`-token spans, none equal to the answer
    or to each other, at random offsets >= `context` (like the answer: no choice is a document's first tokens,
    which an ARM's unconditional logits after EOS would single out), from other documents (`source` "other":
    draws from the text's unconditional distribution, so guidance's contrast is the best rule by construction)
    or from the item's own document outside its window ("same": on topic, so the context must decide).
    Deterministic in `seed`."""
    if distractors < 1:
        raise ValueError(f"--distractors must be >= 1, got {distractors}")
    if source not in SOURCES:
        raise ValueError(f"--distractors-from must be one of {SOURCES}, got {source!r}")
    need = context + choice
    # "same": room for the window and `distractors` spans beside it, at offsets >= context
    longest = need if source == "other" else need + context + distractors * choice
    pool = [i for i, d in enumerate(docs) if len(d) >= longest]
    if len(pool) < (distractors + 1 if source == "other" else 1):
        raise ValueError(f"{len(pool)} validation documents have {longest}+ tokens; the items need at least "
                         + (f"{distractors + 1} (--distractors {distractors} + 1) of them" if source == "other"
                            else "one"))
    g = np.random.default_rng(seed)
    per_doc = -(-n // len(pool))
    cuts = [(int(i), _cuts(g, len(docs[i]), need, per_doc)) for i in g.permutation(pool)]
    windows = [(i, c[r]) for r in range(per_doc) for i, c in cuts if r < len(c)][:n]
    contexts, choices, labels = [], [], []
    for i, cut in windows:
        d = docs[i]
        answer = d[cut + context:cut + need].tolist()
        others, tries = [], 0
        while len(others) < distractors:
            tries += 1
            if tries > 1000 * distractors:  # e.g. documents that repeat one token: no distinct spans to find
                where = "other documents" if source == "other" else "the rest of its document"
                raise ValueError(f"found only {len(others)} distinct {choice}-token spans unlike the answer of "
                                 f"document {i} (at {cut + context}) in {where}; --distractors {distractors} "
                                 f"needs more varied text")
            j = int(g.choice(pool)) if source == "other" else i
            if source == "other" and j == i:
                continue
            a = int(g.integers(context, len(docs[j]) - choice + 1))
            if source == "same" and a + choice > cut and a < cut + need:  # not inside the item's own window
                continue
            span = docs[j][a:a + choice].tolist()
            if span != answer and span not in others:
                others.append(span)
        label = int(g.integers(0, distractors + 1))
        contexts.append(d[cut:cut + context].tolist())
        choices.append(others[:label] + [answer] + others[label:])
        labels.append(label)
    where = np.array(windows, dtype=np.int64).reshape(-1, 2)
    return Items(contexts, choices, np.array(labels), where, groups=where[:, 0].copy())


def load_items(data, n: int, context: int, choice: int, distractors: int, seed: int = 0,
               source: str = "other") -> Items:
    """`make_items` over the validation documents of the dataset `data` (either shard format), drawn from its
    first max(8n, distractors + 1) documents long enough, so a large split is not read whole."""
    from smdm.data import documents

    docs = []
    for d in documents(data, "val"):
        if len(d) >= context + choice:
            docs.append(d)
            if len(docs) >= max(8 * n, distractors + 1):
                break
    return make_items(docs, n, context, choice, distractors, seed, source)


def pairs_of(items: Items) -> list:
    """The (context, choice) pairs, item after item."""
    return [(c, ch) for c, chs in zip(items.contexts, items.choices) for ch in chs]


def arm_guided_nll(arm, pairs: list, weights, uncond_prefix: list, *, batch_size: int = 32) -> dict:
    """{w: (P,) float64} -log of each continuation under the ARM's guided per-token distribution
    log_softmax(u + (w + 1)(c - u)) (`smdm.sampling.guided_logits`, the MDM's formula), c its logits after the
    context, u after `uncond_prefix` alone; w = 0 is the exact -log p, the same bits as `evaluate.score`
    (unconditional rows run only for w > 0). One forward pass per batch (`batch_size` model rows, a guided
    pair counting two) serves every weight; batch-invariant logits."""
    import torch
    import torch.nn.functional as F

    from smdm.sampling import guided_logits, logits_at

    weights = [float(w) for w in weights]
    guide = any(w > 0 for w in weights)
    if guide and not uncond_prefix:
        raise ValueError("uncond_prefix is empty: the unconditional logits need a token to follow (EOS)")
    for k, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {k}: the context and the continuation need a token each, got "
                             f"{len(ctx)} and {len(cont)}")
    out = {w: np.zeros(len(pairs)) for w in weights}
    per_pass = max(1, batch_size // (2 if guide else 1))  # model rows per forward pass, as `evaluate.score`
    with torch.no_grad():
        for a in range(0, len(pairs), per_pass):
            chunk = pairs[a:a + per_pass]
            seqs = [torch.tensor(ctx + cont) for ctx, cont in chunk]
            # the logits at position p predict token p + 1: a continuation after a prefix of length m is
            # predicted at m - 1 ... m + len - 2
            rows = [torch.full((len(cont),), j) for j, (_, cont) in enumerate(chunk)]
            pos = [torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1) for ctx, cont in chunk]
            if guide:
                seqs += [torch.tensor(uncond_prefix + cont) for _, cont in chunk]
                rows += [torch.full((len(cont),), len(chunk) + j) for j, (_, cont) in enumerate(chunk)]
                m = len(uncond_prefix)
                pos += [torch.arange(m - 1, m + len(cont) - 1) for _, cont in chunk]
            # (n or 2n, V): the conditional rows' positions, then the unconditional rows'
            logits = logits_at(arm, seqs, torch.cat(rows), torch.cat(pos))
            n = sum(len(cont) for _, cont in chunk)
            target = torch.tensor([t for _, cont in chunk for t in cont], device=logits.device)  # (n,)
            owner = torch.cat(rows[:len(chunk)]).to(logits.device)  # (n,) pair of each position
            for w in weights:
                g = guided_logits(logits[:n], logits[n:] if w > 0 else None, w)  # (n, V) float32; w 0: exact
                nll = -F.log_softmax(g, -1).gather(1, target[:, None])[:, 0].double()  # (n,)
                per_pair = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device).index_add_(0, owner, nll)
                out[w][a:a + len(chunk)] = per_pair.cpu().numpy()
    return out


def mc_items(path, tokenizer, eos_id: Optional[int], limit: Optional[int] = None) -> Items:
    """The items of a multiple-choice JSONL file (`smdm eval mc`'s format and tokenization: `read_mc`,
    `encode_pair`; an empty context stands for EOS, as in `evaluate_mc`)."""
    from smdm.evaluate import encode_mc_item, read_mc

    contexts, choices, labels, lines, chars = [], [], [], [], []
    for it in read_mc(path, limit):
        try:
            ctx, conts = encode_mc_item(tokenizer, it, eos_id)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        contexts.append(ctx)
        choices.append(conts)
        labels.append(it.label)
        lines.append(it.line)
        chars.append([len(c) for c in it.choices])
    return Items(contexts, choices, np.array(labels), np.array(lines, dtype=np.int64).reshape(-1, 1), chars)


def accuracy(nll: np.ndarray, items: Items, norm: bool = False) -> np.ndarray:
    """(N,) 1.0 where the lowest score of an item's choices is its answer (the first index on ties); `norm`:
    the score per character of the choice (lm-eval's acc_norm, `--mc` items)."""
    hits, a = np.zeros(len(items.labels)), 0
    for q, chs in enumerate(items.choices):
        s = nll[a:a + len(chs)] / (np.array(items.chars[q], dtype=np.float64) if norm else 1.0)
        hits[q] = float(int(np.argmin(s)) == int(items.labels[q]))
        a += len(chs)
    return hits


def stderr(x: np.ndarray, groups: Optional[np.ndarray] = None) -> float:
    """Standard error of the mean of x; with `groups`, cluster-robust (the items of a group share their
    errors): sqrt(G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2) / n over G groups, which is the plain
    std(ddof=1) / sqrt(n) when every item is its own group. NaN with fewer than 2 items or groups."""
    x = np.asarray(x, dtype=np.float64)
    if groups is None:
        groups = np.arange(len(x))
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(g.max()) + 1 if len(x) else 0
    if len(x) < 2 or n_groups < 2:
        return float("nan")
    sums = np.bincount(g, weights=x - x.mean(), minlength=n_groups)
    return float(math.sqrt(n_groups / (n_groups - 1) * float((sums ** 2).sum())) / len(x))


def records_for(model: str, scores: dict, items: Items, **extra) -> list:
    """One record per weight: accuracy (and acc_norm for `--mc` items), its standard error, and the paired
    difference to w = 0 (if scored); standard errors clustered by `items.groups`."""
    metrics = ("acc", "acc_norm") if items.chars is not None else ("acc",)
    hits = {(w, m): accuracy(nll, items, norm=m == "acc_norm") for w, nll in scores.items() for m in metrics}
    recs = []
    for w in scores:
        r = {"model": model, "cfg": w, "n": len(items.labels), **extra}
        for m in metrics:
            h = hits[w, m]
            r.update({m: float(h.mean()), f"{m}_stderr": stderr(h, items.groups)})
            if (0.0, m) in hits and w != 0.0:
                d = h - hits[0.0, m]
                r.update({f"{m}_delta_vs_w0": float(d.mean()), f"{m}_delta_stderr": stderr(d, items.groups)})
        r["nll"] = scores[w].tolist()
        recs.append(r)
    return recs


def table(records: list, chance: float) -> str:
    metrics = [m for m in ("acc", "acc_norm") if m in records[0]]
    head = f"{'model':<6} {'cfg w':>6}" + "".join(f" {m:>8} {'+-se':>6} {'vs w=0':>8} {'+-se':>6}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in records:
        row = f"{r['model']:<6} {r['cfg']:>6g}"
        for m in metrics:
            d = (f"{r[m + '_delta_vs_w0']:+8.3f} {r[m + '_delta_stderr']:6.3f}" if m + "_delta_vs_w0" in r
                 else f"{'-':>8} {'':>6}")
            row += f" {r[m]:>8.3f} {r[m + '_stderr']:>6.3f} {d}"
        lines.append(row)
    lines.append(f"(chance {chance:.3f})")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from smdm.benchmarks.frontier import _default_data, _load, load_twin
    from smdm.evaluate import eos_id_of, score

    prog = "smdm bench cfg"
    from smdm.benchmarks import set_threads

    set_threads(args.threads)  # torch's and the Rust sampler's
    if any(not math.isfinite(w) or w < 0 for w in args.cfg):
        raise SystemExit(f"{prog}: error: --cfg weights must be finite and >= 0, got {args.cfg}")
    if args.method == "chain" and args.estimator != "time":
        raise SystemExit(f"{prog}: error: --estimator {args.estimator} is the ELBO's; --method chain is exact")
    if args.method == "chain" and args.n_samples != N_SAMPLES:
        raise SystemExit(f"{prog}: error: --n-samples {args.n_samples} is the ELBO's; --method chain is exact")
    weights = sorted({float(w) for w in args.cfg} | {0.0})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mdm, tok, digest, step = _load("--mdm", args.mdm, device, "float32", prog)
    if mdm.config.causal:
        raise SystemExit(f"{prog}: error: --mdm {args.mdm} is an autoregressive checkpoint")
    arm = None if args.arm is None else load_twin("--arm", args.arm, mdm, digest, device, "float32", prog)
    eos = eos_id_of(tok) if tok is not None else None
    if arm is not None and eos is None:
        raise SystemExit(f"{prog}: error: --mdm {args.mdm}: no tokenizer with an EOS token, which the ARM's "
                         f"unconditional context needs")
    models = [(m, what) for m, what in ((mdm, "--mdm"), (arm, "--arm")) if m is not None]
    if args.mc is not None:
        if args.data is not None:
            raise SystemExit(f"{prog}: error: give --mc FILE or --data DIR, not both")
        if tok is None:
            raise SystemExit(f"{prog}: error: --mdm {args.mdm} has no tokenizer.json to encode --mc {args.mc}")
        try:
            items = mc_items(args.mc, tok, eos, args.n)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{prog}: error: --mc {e}" if str(args.mc) in str(e) else
                             f"{prog}: error: --mc {args.mc}: {e}") from None
        for q, (ctx, chs) in enumerate(zip(items.contexts, items.choices)):
            for j, c in enumerate(chs):
                for m, what in models:
                    if len(ctx) + len(c) > m.config.max_seq_len:
                        raise SystemExit(f"{prog}: error: --mc {args.mc}:{int(items.where[q, 0])}: context + "
                                         f"choice {j} = {len(ctx) + len(c)} tokens do not fit {what}'s context "
                                         f"of {m.config.max_seq_len}")
        what_items = f"{len(items.labels)} questions from {args.mc}"
        common = dict(mc=str(args.mc), seed=args.seed)
    else:
        data = args.data or _default_data(step, prog)
        longest = args.context + args.choice
        for m, what in models:
            if longest > m.config.max_seq_len:
                raise SystemExit(f"{prog}: error: --context + --choice = {longest} tokens do not fit {what}'s "
                                 f"context of {m.config.max_seq_len}")
        n = 200 if args.n is None else args.n
        try:
            items = load_items(data, n, args.context, args.choice, args.distractors, args.seed,
                               args.distractors_from)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{prog}: error: --data {data}: {e}") from None
        if len(items.labels) < n:
            print(f"note: {data} gave {len(items.labels)} items (asked for {n}): not enough validation documents "
                  f"of {longest}+ tokens for more non-overlapping windows", file=sys.stderr)
        source = "other documents" if args.distractors_from == "other" else "the same document"
        what_items = (f"{len(items.labels)} items from {len(np.unique(items.groups))} documents of {data} (val): "
                      f"{args.context}-token context, the true {args.choice} tokens among {args.distractors + 1} "
                      f"choices, the others from {source}")
        common = dict(data=str(data), context=args.context, choice=args.choice, choices=args.distractors + 1,
                      distractors_from=args.distractors_from, documents=int(len(np.unique(items.groups))),
                      seed=args.seed)
    pairs = pairs_of(items)
    print(f"unsupervised CFG: MDM {args.mdm}" + (f", ARM twin {args.arm}" if arm is not None else "")
          + f"; {what_items}; MDM "
          + (f"ELBO with {args.n_samples} samples ({args.estimator} estimator)" if args.method == "elbo"
             else "chain rule, left to right")
          + f"; device {device}, {torch.get_num_threads()} threads", flush=True)
    with torch.no_grad():
        mdm_scores = {w: score(mdm, pairs, method=args.method, n_samples=args.n_samples, seed=args.seed, cfg=w,
                               batch_size=args.batch_size, estimator=args.estimator).nll for w in weights}
    how = {"n_samples": args.n_samples, "estimator": args.estimator} if args.method == "elbo" else {}
    records = records_for("mdm", mdm_scores, items, method=args.method, **how, **common)
    if arm is not None:
        arm_scores = arm_guided_nll(arm, pairs, weights, [eos], batch_size=args.batch_size)
        records += records_for("arm", arm_scores, items, **common)
    print(table(records, float(np.mean([1 / len(chs) for chs in items.choices]))))
    print("acc: the right choice scored best (+- its standard error; acc_norm: per character); vs w=0: the "
          "paired difference to the same model without guidance on the same items. MDM: "
          + ("ELBO" if args.method == "elbo" else "chain rule, left to right,")
          + " with guided logits, the unconditional row masks the context; ARM: exact at w=0, else the same "
          "contrast per token against its logits after a lone EOS")
    if args.json:
        env = environment(device=str(device), mdm=args.mdm, arm=args.arm)
        write_records([{**r, "labels": items.labels.tolist(), "where": items.where.tolist(), "environment": env}
                       for r in records], args.json)
    return 0


def register(parser: argparse.ArgumentParser, name: str | None = None) -> argparse.ArgumentParser:
    """Add the `cfg` benchmark's options to `parser` and set `func`."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--mdm", required=True, metavar="DIR", help="the MDM checkpoint (run or step dir)")
    parser.add_argument("--arm", metavar="DIR", help="its ARM twin (same tokenizer): scored exactly and with the "
                        "same contrast")
    parser.add_argument("--data", metavar="DIR", help="dataset whose val documents give the items (default: the "
                        "MDM's training data, else the built-in corpus)")
    parser.add_argument("--mc", metavar="FILE", help="instead: a multiple-choice JSONL file, `smdm eval mc`'s "
                        "format ({\"context\", \"choices\", \"label\"}; e.g. a benchmark): acc and acc_norm")
    parser.add_argument("--cfg", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                        help="guidance weights w (0 is always included; default 0 0.5 1 2 4)")
    parser.add_argument("--n", type=positive_int, default=None, help="items (default 200; --mc: the first N "
                        "questions, default all)")
    parser.add_argument("--context", type=positive_int, default=48, help="context tokens (default 48)")
    parser.add_argument("--choice", type=positive_int, default=16, help="tokens per choice (default 16)")
    parser.add_argument("--distractors", type=positive_int, default=3, help="wrong choices per item (default 3)")
    parser.add_argument("--distractors-from", choices=SOURCES, default="other", help="held-out items: the wrong "
                        "choices are spans of other documents (default; guidance's contrast is the best rule by "
                        "construction) or of the item's own document (on topic)")
    parser.add_argument("--method", choices=("elbo", "chain"), default="elbo", help="the MDM's score: Monte Carlo "
                        "ELBO (default) or the exact chain rule left to right (one forward pass per token)")
    parser.add_argument("--n-samples", type=positive_int, default=N_SAMPLES,
                        help="the MDM's Monte Carlo ELBO samples per choice (default 32)")
    parser.add_argument("--estimator", choices=ELBO_ESTIMATORS, default="time", help="the MDM's ELBO: time "
                        "(1/t weights, the paper's; default) or count (LLaDA's, finite variance; smdm.evaluate.score)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="model rows per forward pass (a "
                        "guided pair counts two)")
    parser.add_argument("--seed", type=int, default=0, help="items and the ELBO's noise")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of torch and of the Rust core (default: all)")
    parser.add_argument("--json", metavar="FILE", type=json_out, help="write one JSON record per (model, w)")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m smdm.benchmarks.cfg
    p = register(argparse.ArgumentParser(prog="smdm bench cfg"))
    a = p.parse_args()
    sys.exit(a.func(a))
