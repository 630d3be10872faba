# smdm bench reversal [--quick] [--facts 200] [--steps 5000] [--seeds 0 1] [--json reversal.json] [--out DIR]
"""`smdm bench reversal`: a CPU-sized replication of the reversal-curse experiment of Nie et al. 2024
("Scaling up Masked Diffusion Models on Text", after Berglund et al. 2023): an MDM and its ARM twin are trained
on facts written in one direction only, "NAME is DESC", and then asked the other way round.

Why this design (so the two models differ only in their objective):
- Facts: N random (NAME, DESC) pairs; a NAME is `name_len` words from a pool of capitalised synthetic words,
  a DESC `desc_len` words from a disjoint pool of lowercase ones, both unique across facts; the template word
  "is" joins them. A word-level tokenizer (`tokenizers` WordLevel, a real tokenizer.json) gives one token per
  word, so every fact is the same row of `name_len + 1 + desc_len + 1` tokens. Each seed of --seeds fixes the
  facts, the tokenizer, both inits, the data order and the masks.
- Training: the bundled trainer (`smdm.train`, as `smdm train --sft F --tokenizer T` runs it) on one JSONL
  line per fact with an EMPTY prompt and the response "NAME is DESC": each row is exactly one fact + EOS, so
  both models see the same rows in the same order (the SFT reader's order depends only on the seed) for the
  same steps, batch and LR. An empty prompt makes it plain language modelling of the fact: the MDM masks and
  learns every token (NAME included), the ARM learns every next token (no BOS: the first NAME word is never a
  target). A prompt = NAME split would be wrong for this question: the MDM never masks a prompt, so it could
  never learn to produce names. Packed pretraining windows would cut facts at window edges and give the ARM
  one more token per window than the MDM.
- `--both-frac F`: Berglund's control, a fraction of the facts is also shown reversed ("DESC is NAME"); the
  probes then report those facts separately and the forward-only facts are the test of the curse.

Probes (exact match, greedy decoding at temperature 0, every fact; the MDM's low_confidence sampler with one
token per step, prompts laid out exactly as the training rows):
  forward          "NAME is" -> DESC                       (both models)
  reverse          "DESC is" -> NAME                       (both; the order was never seen in training)
  reverse infill   "[mask]*name_len is DESC <eos>" -> NAME   (the MDM only: its natural query, `smdm.infill`)
and the likelihood view, independent of greedy decoding: the rank of the true NAME among all N names
  reverse rank         by log p(NAME | "DESC is"): the ARM exactly; the MDM by its chain rule over the NAME
                       averaged over every order (= its exact ELBO for the NAME) with the row's EOS given
  reverse infill rank  by log p(NAME | "_ _ is DESC <eos>") (MDM, the same order-averaged chain rule)
The scorers are `smdm.evaluate`'s exact methods: the ARM's `score(method="ar")`, the MDM's
`score_positions(method="chain")` (any positions: the NAME before its context) averaged over every order.
Candidates share most input rows (one NAME word revealed, the other masked), which `score_positions` runs once.
Ranks count ties against the true name (a constant scorer gets rank N). Chance: 1/N for exact match and top-1
(guessing among the known names/descriptions), (N + 1)/2 for the mean rank.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smdm.benchmarks import environment, write_records
from smdm.cli import fraction, json_out, positive_int

EOS = "<|endoftext|>"
TEMPLATE = "is"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
N_SAMPLES = 5  # facts whose greedy answers go into the JSON
QUICK = dict(facts=24, steps=600, config="tiny", batch_size=16)


@dataclass
class Facts:
    """N facts as word lists; `both[i]`: fact i is also trained in the reversed form (the control)."""

    names: list  # N tuples of name_len capitalised words
    descs: list  # N tuples of desc_len lowercase words
    both: np.ndarray  # (N,) bool
    vocab: list  # every word, specials first (token id = index)


def _words(rng: np.random.Generator, n: int) -> list:
    """n distinct synthetic words consonant-vowel-consonant-vowel ("kavo")."""
    seen: set = set()
    while len(seen) < n:
        w = "".join(rng.choice(list(CONSONANTS if j % 2 == 0 else VOWELS)) for j in range(4))
        seen.add(w)
    return sorted(seen)


def make_facts(n: int, seed: int, *, name_len: int = 2, desc_len: int = 3, name_pool: int = 24,
               desc_pool: int = 24, both_frac: float = 0.0) -> Facts:
    """Random unique (NAME, DESC) pairs from disjoint word pools (module docstring); deterministic in seed."""
    if n > name_pool ** name_len or n > desc_pool ** desc_len:
        raise ValueError(f"{n} facts need more distinct names/descriptions than the pools give "
                         f"({name_pool}^{name_len}, {desc_pool}^{desc_len})")
    rng = np.random.default_rng([seed, 0x5E7])
    words = _words(rng, name_pool + desc_pool)
    order = rng.permutation(len(words))
    name_words = sorted(words[i].capitalize() for i in order[:name_pool])
    desc_words = sorted(words[i] for i in order[name_pool:])

    def unique(pool, k):
        out: set = set()
        picked = []
        while len(picked) < n:
            t = tuple(pool[j] for j in rng.integers(0, len(pool), size=k))
            if t not in out:
                out.add(t)
                picked.append(t)
        return picked

    names, descs = unique(name_words, name_len), unique(desc_words, desc_len)
    both = np.zeros(n, dtype=bool)
    both[rng.permutation(n)[:int(round(both_frac * n))]] = True
    return Facts(names, descs, both, [EOS, "<unk>", TEMPLATE] + name_words + desc_words)


def write_tokenizer(facts: Facts, path: Path) -> Path:
    """A word-level tokenizer.json: one id per word, split on whitespace, EOS = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(facts.vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.save(str(path))
    return path


def write_training_file(facts: Facts, path: Path) -> int:
    """The SFT JSONL: empty prompt, response "NAME is DESC" (plus "DESC is NAME" for the control facts)."""
    lines = []
    for name, desc, both in zip(facts.names, facts.descs, facts.both):
        lines.append({"prompt": "", "response": " ".join((*name, TEMPLATE, *desc))})
        if both:
            lines.append({"prompt": "", "response": " ".join((*desc, TEMPLATE, *name))})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return len(lines)


def train_model(objective: str, data: Path, tokenizer: Path, out: Path, *, config: str, steps: int,
                batch_size: int, lr: float, seq_len: int, seed: int, threads: int):
    """One model with the bundled trainer (SFT mode, empty prompts); returns (model, tokenizer, seconds)."""
    from smdm import checkpoint
    from smdm.config import TrainConfig
    from smdm.train import train

    cfg = TrainConfig(config=config, objective=objective, sft=str(data), tokenizer=str(tokenizer), out=str(out),
                      max_steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len, seed=seed,
                      threads=threads, val_every=0, save_every=0, overwrite=True, device="cpu")
    t0 = time.perf_counter()
    trainer = train(cfg)
    seconds = time.perf_counter() - t0
    if trainer.step < steps:  # SIGTERM makes the trainer save and return early: no results from a cut run
        raise SystemExit(f"smdm bench reversal: the {objective} run stopped at step {trainer.step} of {steps}")
    model, tok = checkpoint.load(out, device="cpu")
    return model, tok, seconds


# ----------------------------------------------------------------------------------------------------
# probes


def greedy_fill(model, prompts: list, length: int) -> list:
    """Greedy continuation of each prompt up to `length` tokens (the training row length): ARM left to
    right, MDM low_confidence with one token per step. Returns the generated ids per prompt."""
    from smdm.sampling import generate

    gen = length - len(prompts[0])
    kw = {} if model.config.causal else dict(sampler="low_confidence", steps=gen)
    out = generate(model, prompts, gen_length=gen, temperature=0.0, seed=0, **kw)
    return [s[len(p):] for s, p in zip(out.sequences, prompts)]


def infill_names(model, rows: list, k: int) -> list:
    """MDM: fill positions [0, k) of each row (one token per step, greedy); the filled first k ids."""
    from smdm.sampling import infill

    out = infill(model, rows, mask_positions=[list(range(k))] * len(rows), steps=k, temperature=0.0, seed=0)
    return [s[:k] for s in out.sequences]


def mdm_target_nll(model, rows, positions: list, *, batch: int = 512) -> np.ndarray:
    """-log p(x[positions] | the rest of the row) for each row of `rows` (R, L) int64, by the MDM's chain rule
    averaged over every order of the positions (= its exact ELBO for those tokens, `diffusion.elbo_exact`):
    `smdm.evaluate.score_positions(method="chain")` per order (it runs each distinct input row once, and the
    candidates of one fact share most rows). (R,) float64."""
    from smdm.evaluate import score_positions

    items = [(r, positions) for r in rows.tolist()]
    orders = list(itertools.permutations(range(len(positions))))
    return np.mean([score_positions(model, items, method="chain", order=[list(o)] * len(items), batch_size=batch,
                                    batch_invariant=False).nll for o in orders], axis=0)


def arm_target_nll(model, rows, start: int, *, batch: int = 512) -> np.ndarray:
    """The ARM's exact -log p(x[start:] | x[:start]) for each row of `rows` (R, L) int64:
    `smdm.evaluate.score(method="ar")`. (R,) float64."""
    from smdm.evaluate import score

    pairs = [(r[:start], r[start:]) for r in rows.tolist()]
    return score(model, pairs, method="ar", batch_size=batch, batch_invariant=False).nll


def ranks(nll: np.ndarray) -> np.ndarray:
    """nll (N, N): row i scores every candidate name for fact i; the true one is column i. Rank 1 = best;
    candidates that tie the true one count as better (pessimistic)."""
    return (nll <= np.diag(nll)[:, None]).sum(1)  # the true name counts itself


def run_probes(mdm, arm, facts: Facts, tok) -> dict:
    """Every probe for both models: ({probe: {"mdm": per-fact array, "arm": ...}}, decoded sample answers)."""
    import torch

    ids = lambda words: [tok.token_to_id(w) for w in words]  # noqa: E731
    q = {"names": [ids(n) for n in facts.names], "descs": [ids(d) for d in facts.descs],
         "is": tok.token_to_id(TEMPLATE), "eos": tok.token_to_id(EOS)}
    N, k, m = len(facts.names), len(q["names"][0]), len(q["descs"][0])
    L = k + 1 + m + 1
    names, descs = np.array(q["names"]), np.array(q["descs"])
    out = {}
    fwd = [n + [q["is"]] for n in q["names"]]
    rev = [d + [q["is"]] for d in q["descs"]]
    samples = {}  # the greedy outputs, decoded, for the first facts (what the models answer)
    for key, model in (("mdm", mdm), ("arm", arm)):
        f, r = np.array(greedy_fill(model, fwd, L))[:, :m], np.array(greedy_fill(model, rev, L))[:, :k]
        out.setdefault("forward", {})[key] = (f == descs).all(1)
        out.setdefault("reverse", {})[key] = (r == names).all(1)
        samples[f"forward {key}"], samples[f"reverse {key}"] = f[:N_SAMPLES], r[:N_SAMPLES]
    mask = mdm.config.mask_id
    rows = [[mask] * k + [q["is"]] + d + [q["eos"]] for d in q["descs"]]
    filled = np.array(infill_names(mdm, rows, k))
    out["reverse infill"] = {"mdm": (filled == names).all(1)}
    samples["reverse infill mdm"] = filled[:N_SAMPLES]
    # every candidate NAME in every fact's query: (N, N, L) rows, fact i's DESC with candidate c
    cand = np.repeat(names[None], N, 0)  # (N, N, k)
    d = np.repeat(descs[:, None], N, 1)  # (N, N, m)
    is_, eos = np.full((N, N, 1), q["is"]), np.full((N, N, 1), q["eos"])
    rev_rows = torch.from_numpy(np.concatenate([d, is_, cand, eos], 2).reshape(N * N, L)).long()
    inf_rows = torch.from_numpy(np.concatenate([cand, is_, d, eos], 2).reshape(N * N, L)).long()
    out["reverse rank"] = {"mdm": ranks(mdm_target_nll(mdm, rev_rows, list(range(m + 1, m + 1 + k))).reshape(N, N)),
                           "arm": ranks(arm_target_nll(arm, rev_rows[:, :m + 1 + k], m + 1).reshape(N, N))}
    out["reverse infill rank"] = {"mdm": ranks(mdm_target_nll(mdm, inf_rows, list(range(k))).reshape(N, N))}
    return out, [{"fact": " ".join((*facts.names[i], TEMPLATE, *facts.descs[i])),
                  **{what: tok.decode(v[i].tolist(), skip_special_tokens=False) for what, v in samples.items()}}
                 for i in range(min(N, N_SAMPLES))]


def summarize(per_fact: dict, facts: Facts) -> dict:
    """Accuracies / top-1 and mean ranks over the forward-only facts (and, with the control, the others)."""
    N = len(facts.names)
    subsets = {"forward-only": ~facts.both}
    if facts.both.any():
        subsets["both-directions"] = facts.both
    res = {}
    for probe, by_model in per_fact.items():
        for subset, sel in subsets.items():
            row = {}
            for key, v in by_model.items():
                v = np.asarray(v)[sel]
                if "rank" in probe:
                    row[key] = {"top1": float((v == 1).mean()), "mean_rank": float(v.mean()),
                                "mrr": float((1.0 / v).mean())}
                else:
                    row[key] = {"accuracy": float(v.mean())}
            row["chance"] = ({"top1": 1.0 / N, "mean_rank": (N + 1) / 2, "mrr": float(np.mean(1 / np.arange(1, N + 1)))}
                             if "rank" in probe else {"accuracy": 1.0 / N})
            row["n"] = int(sel.sum())
            res[f"{probe} [{subset}]" if len(subsets) > 1 else probe] = row
    return res


def print_table(results: list) -> None:
    """One table: probe rows, MDM / ARM / chance columns (mean over seeds; the spread when several)."""
    names = list(results[0]["probes"])
    w = 22 if len(results) > 1 else 8
    print(f"\n{'probe':44s} {'MDM':>{w}s} {'ARM':>{w}s} {'chance':>8s}")
    for probe in names:
        metrics = ["top1", "mean_rank"] if "rank" in probe else ["accuracy"]
        for metric in metrics:
            cells = []
            for key in ("mdm", "arm"):
                vals = [r["probes"][probe].get(key, {}).get(metric) for r in results]
                if vals[0] is None:
                    cells.append("—")
                    continue
                fmt = "{:.1f}" if metric == "mean_rank" else "{:.3f}"
                s = fmt.format(float(np.mean(vals)))
                if len(vals) > 1:
                    s += " (" + "/".join(fmt.format(v) for v in vals) + ")"
                cells.append(s)
            chance = results[0]["probes"][probe]["chance"][metric]
            label = f"{probe} {metric}" if "rank" in probe else f"{probe} acc"
            print(f"{label:44s} {cells[0]:>{w}s} {cells[1]:>{w}s} {chance:8.3g}")


def run_seed(args, seed: int, root: Path) -> dict:
    """Facts, tokenizer and data for one seed; both models trained alike; every probe."""
    facts = make_facts(args.facts, seed, name_len=args.name_len, desc_len=args.desc_len,
                       name_pool=args.name_pool, desc_pool=args.desc_pool, both_frac=args.both_frac)
    root.mkdir(parents=True, exist_ok=True)
    tok_path = write_tokenizer(facts, root / "tokenizer.json")
    rows = write_training_file(facts, root / "facts.jsonl")
    seq_len = args.name_len + 1 + args.desc_len + 1
    common = dict(config=args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seq_len=seq_len,
                  seed=seed, threads=args.threads)
    mdm, tok, t_mdm = train_model("mdm", root / "facts.jsonl", tok_path, root / "mdm", **common)
    arm, _, t_arm = train_model("ar", root / "facts.jsonl", tok_path, root / "arm", **common)
    t0 = time.perf_counter()
    per_fact, samples = run_probes(mdm, arm, facts, tok)
    t_eval = time.perf_counter() - t0
    return {"seed": seed, "training_rows": rows, "seconds": {"train_mdm": t_mdm, "train_arm": t_arm,
                                                             "eval": t_eval},
            "final_loss": {k: _final_loss(root / k) for k in ("mdm", "arm")},
            "probes": summarize(per_fact, facts),
            "samples": samples}


def _final_loss(run_dir: Path):
    """Mean training loss of the last 5% of steps (metrics.jsonl)."""
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    tail = losses[-max(1, len(losses) // 20):]
    return float(np.mean(tail)) if tail else None


def run(args: argparse.Namespace) -> int:
    import torch

    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in dict(facts=200, steps=5000, config="tiny", batch_size=32).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from smdm.model import config_by_name

    try:  # said before any run starts (a bad size was a TrainError traceback, too many facts a ValueError one)
        config_by_name(args.config)
        make_facts(args.facts, 0, name_len=args.name_len, desc_len=args.desc_len, name_pool=args.name_pool,
                   desc_pool=args.desc_pool)
    except ValueError as e:
        raise SystemExit(f"smdm bench reversal: error: {e}") from None
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="smdm-reversal-") as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        for seed in args.seeds:
            print(f"== seed {seed}: {args.facts} facts, {args.config}, {args.steps} steps × {args.batch_size} rows",
                  flush=True)
            results.append(run_seed(args, seed, base / f"seed-{seed}"))
    wall = time.perf_counter() - t0
    print_table(results)
    print(f"\nN = {args.facts} facts, {len(args.seeds)} seed(s) {args.seeds}, config {args.config}, "
          f"{args.steps} steps × {args.batch_size} rows, lr {args.lr}, {args.threads} threads, "
          f"wall {wall:.0f} s")
    settings = {k: getattr(args, k) for k in ("facts", "name_len", "desc_len", "name_pool", "desc_pool",
                                              "both_frac", "config", "steps", "batch_size", "lr", "seeds",
                                              "threads", "quick")}
    record = {"bench": "reversal", "settings": settings, "wall_seconds": wall, "runs": results,
              "environment": environment()}
    if args.json:
        write_records([record], args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--quick", action="store_true", help=f"a ~30 s smoke run ({QUICK})")
    a("--facts", type=positive_int, default=None, help="number of facts N (default 200; --quick 24)")
    a("--name-len", type=positive_int, default=2, help="words per NAME")
    a("--desc-len", type=positive_int, default=3, help="words per DESC")
    a("--name-pool", type=positive_int, default=24, help="distinct name words")
    a("--desc-pool", type=positive_int, default=24, help="distinct description words")
    a("--both-frac", type=fraction, default=0.0, help="fraction of facts also trained reversed (control)")
    a("--config", default=None, help="model size for both models (default tiny)")
    a("--steps", type=positive_int, default=None, help="optimizer steps for each model (default 5000; --quick 600)")
    a("--batch-size", type=positive_int, default=None, help="rows per step (default 32; --quick 16)")
    a("--lr", type=float, default=2e-3, help="peak learning rate (both models)")
    a("--seeds", type=int, nargs="+", default=[0], help="one full run (facts, models, probes) per seed")
    a("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    a("--out", default=None, help="keep facts, tokenizer and both checkpoints here (default: a temp dir)")
    a("--json", default=None, type=json_out, help="write the settings and results here")
    parser.set_defaults(func=run)
    return parser
