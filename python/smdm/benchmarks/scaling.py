# smdm bench scaling --quick            (a ~1 minute smoke run on the built-in corpus)
"""`smdm bench scaling`: an IsoFLOP sweep of the MDM and its autoregressive twin (the paper's scaling study,
Nie et al. 2024 §3: "MDMs scale at a rate comparable to ARMs, with a relatively small compute gap").

For every compute budget C and model size N (non-embedding parameters), both objectives are trained by the
bundled trainer with `--flops C` (steps = C / (6 N tokens per step), the same data, batch, learning rate and
seed), then scored on the same validation windows by `smdm.evaluate.evaluate_ppl`: the MDM by its Monte Carlo
ELBO (an upper bound on its NLL; what the paper plots), the ARM exactly, in nats per token.

The fits, per objective:
  IsoFLOP minimum   at each budget, a parabola in ln N through the sizes' losses gives the loss-optimal size
                    N*(C) and the minimum L*(C); when the parabola opens downwards or its vertex falls outside
                    the sizes tried, the best size tried is used instead and flagged ("edge": widen the sizes)
  power law         L*(C) = A C^(-alpha), least squares in log-log space over the budgets
  compute gap       the MDM's compute to reach the ARM's L*(C): (A_mdm / L*_arm(C))^(1 / alpha_mdm), divided
                    by C, at each budget (the paper's "MDMs need more compute for the same loss")
  on total FLOPs    C counts 6 N (N non-embedding), the paper's convention; at small sizes the output head is
                    most of the real work, more so for smaller models and for the ARM (every row) than the MDM
                    (masked rows). `fits.total` therefore also compares the objectives on total training FLOPs
                    (6N + head + attention, per run): Pareto fronts, power laws through them, the compute gap.
Fewer than three sizes give no parabola (the best size is used); fewer than two budgets give no power law.

Every finished run writes OUT/runs/<objective>-<size>-C<budget>/result.json (atomically; OUT defaults to
runs/scaling; the checkpoint is in .../train), and a later call with the same settings reuses it: an
interrupted sweep resumes where it stopped. The defaults are CPU-sized (four
sizes from 16k to 443k non-embedding parameters, budgets 3e10 to 3e11 FLOPs: 46 minutes on 2 busy cores;
at these sizes the 8192-token embedding and head dominate the parameters and the time); on GPUs pass
the paper's sizes, e.g. `--sizes 19M 34M 48M 66M 85M --flops 1e18 3e18 1e19 --seq-len 2048 --batch-size 256`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from smdm.benchmarks import environment, write_records
from smdm.cli import json_out
from smdm.config import ELBO_ESTIMATORS

OBJECTIVES = ("mdm", "ar")
DEFAULTS = dict(sizes=["L1-H2-D32-F128", "L2-H2-D48-F192", "L2-H2-D64-F256", "L3-H3-D96-F384"],
                flops=[3e10, 1e11, 3e11], batch_size=16, seq_len=128, val_windows=64, val_samples=16)
QUICK = dict(sizes=["L1-H2-D32-F128", "L2-H2-D48-F192", "L2-H2-D64-F256"], flops=[2e9, 6e9], batch_size=8,
             seq_len=64, val_windows=8, val_samples=4)


# ----------------------------------------------------------------------------------------------------
# one run


def run_one(args, objective: str, size: str, flops: float, root: Path) -> dict:
    """Train one (objective, size, budget) and score it on the validation windows; cached in result.json."""
    from smdm import checkpoint
    from smdm.config import TrainConfig
    from smdm.evaluate import evaluate_ppl
    from smdm.train import TooFewSteps, train

    out = root / "runs" / f"{objective}-{size}-C{flops:.3g}"
    settings = {"objective": objective, "size": size, "flops": flops, "data": str(args.data),
                "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
                "schedule": args.schedule if objective == "mdm" else None, "val_windows": args.val_windows,
                "val_samples": args.val_samples if objective == "mdm" else 0}
    estimator = args.estimator if objective == "mdm" else "time"
    if estimator != "time":  # (results from before the option have no key: the time estimator)
        settings["val_estimator"] = estimator
    cached = _read_result(out / "result.json")
    if cached is not None:
        changed = _changed_settings(cached, {**settings, "val_estimator": estimator})
        if not changed:  # measured the same way
            print(f"   {objective:3s} {size:16s} C={flops:.3g}: cached", flush=True)
            return cached
        # a finished run of other settings is trained again (the trainer's --overwrite deletes its checkpoint):
        # say which settings, or the sweep seems to forget the runs it promised to reuse
        print(f"note: {objective} {size} C={flops:.3g}: {out / 'result.json'} was measured with other settings "
              f"({changed}): training it again", file=sys.stderr, flush=True)
    cfg = TrainConfig(config=size, objective=objective, data=str(args.data), out=str(out / "train"), flops=flops,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                      schedule=settings["schedule"], threads=args.threads, device=args.device, val_every=0,
                      save_every=0, overwrite=True)
    t0 = time.perf_counter()
    try:
        trainer = train(cfg)
    except TooFewSteps as e:  # a budget below one step of this size: recorded; any other error stops the sweep
        result = {**settings, "skipped": str(e)}
        _write_result(out / "result.json", result)
        print(f"   {objective:3s} {size:16s} C={flops:.3g}: skipped ({e})", flush=True)
        return result
    seconds = time.perf_counter() - t0
    if trainer.step < trainer.max_steps:  # SIGTERM: the trainer saved and returned early
        raise SystemExit(f"smdm bench scaling: the {objective} {size} run stopped at step {trainer.step} of "
                         f"{trainer.max_steps}; run the same command again to go on with the sweep (its finished runs "
                         f"are kept; this one starts over)")
    model, _ = checkpoint.load(out / "train", device=args.device if args.device != "auto" else None)
    ev = evaluate_ppl(model, args.data, seq_len=args.seq_len, limit=args.val_windows, n_samples=args.val_samples,
                      seed=args.seed, estimator=estimator)
    result = {**settings, "non_embedding_params": model.config.non_embedding_params(), "steps": trainer.step,
              "train_tokens": trainer.step * args.batch_size * args.seq_len, "train_seconds": seconds,
              "val_nll": ev["nll_per_token"], "val_stderr": ev["stderr"], "val_tokens": ev["tokens"]}
    _write_result(out / "result.json", result)
    print(f"   {objective:3s} {size:16s} C={flops:.3g}: N={result['non_embedding_params']:,} "
          f"{trainer.step} steps, {seconds:.0f} s, val {result['val_nll']:.4f} ± {result['val_stderr']:.4f}",
          flush=True)
    return result


def _changed_settings(cached: dict, settings: dict) -> str:
    """The settings a cached result.json differs in, "key old → new, ..." ("" when none); None (an option left
    at its default: --lr, the ARM's schedule, or a key older results lack) reads "default", except val_estimator:
    results from before the option were scored with the time estimator."""
    old = {"val_estimator": "time", **cached}

    def show(v):
        return "default" if v is None else v

    return ", ".join(f"{k} {show(old.get(k))} → {show(v)}" for k, v in settings.items() if old.get(k) != v)


def _read_result(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_result(path: Path, result: dict) -> None:
    from smdm.data import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2).encode())


# ----------------------------------------------------------------------------------------------------
# fits


def isoflop_minimum(n_params, losses) -> dict:
    """The loss-optimal size at one budget: the vertex of a parabola in ln N (>= 3 sizes) when it opens
    upwards inside the sizes tried, else the best size tried ("edge" True)."""
    x, y = np.log(np.asarray(n_params, dtype=np.float64)), np.asarray(losses, dtype=np.float64)
    best = int(np.argmin(y))
    fallback = {"n_opt": float(np.exp(x[best])), "loss": float(y[best]), "edge": True, "fit": "best tried"}
    if len(x) < 3:
        return fallback
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return fallback
    v = -b / (2 * a)
    if not x.min() <= v <= x.max():
        return fallback
    return {"n_opt": float(np.exp(v)), "loss": float(c - b * b / (4 * a)), "edge": False, "fit": "parabola"}


def power_law(flops, losses) -> dict | None:
    """L = A C^(-alpha) by least squares on (ln C, ln L); None with fewer than two budgets."""
    if len(flops) < 2:
        return None
    slope, intercept = np.polyfit(np.log(flops), np.log(losses), 1)
    return {"A": float(np.exp(intercept)), "alpha": float(-slope)}


def compute_to_reach(law: dict, loss: float) -> float:
    """The compute at which L = A C^(-alpha) reaches `loss`."""
    return float((law["A"] / loss) ** (1.0 / law["alpha"]))


def masked_fraction(schedule=None, eps: float = 1e-3) -> float:
    """The expected fraction of positions an MDM training step masks: 1 - E_t[alpha(p(t))], p = (1 - eps) t + eps,
    t uniform (the trainer's forward process), by the midpoint rule."""
    from smdm import diffusion

    t = (np.arange(4096) + 0.5) / 4096
    return float(1.0 - np.mean(diffusion.alpha((1 - eps) * t + eps, schedule or "linear")))


def training_flops(run: dict, vocab_size: int) -> dict:
    """A finished run's training FLOPs, per token times its training tokens, forward + backward (3x forward):
      nominal    6 N, N the non-embedding parameters: what `--flops` spends (the paper's C = 6 N D)
      head       6 d V at the rows the output head runs on: every row (ARM); the masked rows (MDM: its
                 schedule's expected masked fraction)
      attention  12 n_layer L d: the scores and the weighted values over the L-token window (dense)
    `total` is their sum. In the CPU default sweep the head alone is 0.9-16x the nominal count and the total
    2.1-17.4x it, so equal --flops is not equal compute: `fit_total` compares the objectives on this total."""
    from smdm.model import config_by_name

    cfg = config_by_name(run["size"], vocab_size=vocab_size)
    rows = 1.0 if run["objective"] == "ar" else masked_fraction(run.get("schedule"))
    per_token = {"nominal": 6.0 * cfg.non_embedding_params(), "head": 6.0 * cfg.d_model * vocab_size * rows,
                 "attention": 12.0 * cfg.n_layer * run["seq_len"] * cfg.d_model}
    out = {k: v * run["train_tokens"] for k, v in per_token.items()}
    out["total"] = sum(out.values())
    return out


def pareto_front(points: list) -> list:
    """The (compute, loss) points no cheaper point beats: sorted by compute, each with a loss below all before."""
    front, best = [], float("inf")
    for c, loss in sorted(points):
        if loss < best:
            front.append((c, loss))
            best = loss
    return front


def fit_total(results: list, vocab_size: int) -> dict:
    """The objectives compared on their total training FLOPs (`training_flops`): per objective, the Pareto
    front of all runs (the lowest loss reached for at most that compute) and a power law through it; the
    MDM's compute to reach each ARM front point's loss, over the ARM's compute there (extrapolated outside
    the MDM's range)."""
    out: dict = {"vocab_size": vocab_size, "fronts": {}, "laws": {}, "gap": []}
    for obj in OBJECTIVES:
        rows = [r for r in results if r["objective"] == obj and "val_nll" in r]
        if not rows:
            continue
        front = pareto_front([(training_flops(r, vocab_size)["total"], r["val_nll"]) for r in rows])
        out["fronts"][obj] = [{"flops_total": c, "loss": loss} for c, loss in front]
        out["laws"][obj] = power_law([c for c, _ in front], [loss for _, loss in front])
    out["gap"] = compute_gaps(out["laws"].get("mdm"), out["fronts"].get("ar", []), "flops_total")
    return out


def compute_gaps(mdm_law, arm_points: list, key: str) -> list:
    """At each ARM point (its compute under `key`, its loss): the compute at which the MDM's power law reaches
    that loss, and its ratio to the ARM's compute; none without an MDM law that decreases."""
    if mdm_law is None or mdm_law["alpha"] <= 0:
        return []
    gaps = []
    for p in arm_points:
        need = compute_to_reach(mdm_law, p["loss"])
        gaps.append({key: p[key], "arm_loss": p["loss"], "mdm_flops_for_it": need, "ratio": need / p[key]})
    return gaps


def fit(results: list) -> dict:
    """IsoFLOP minima per (objective, budget), a power law per objective, the MDM's compute gap."""
    out: dict = {"minima": {}, "laws": {}, "gap": []}
    for obj in OBJECTIVES:
        rows = [r for r in results if r["objective"] == obj and "val_nll" in r]
        if not rows:  # not swept (--objectives), or every run skipped
            continue
        minima = []
        for C in sorted({r["flops"] for r in rows}):
            at = [r for r in rows if r["flops"] == C]
            m = isoflop_minimum([r["non_embedding_params"] for r in at], [r["val_nll"] for r in at])
            minima.append({"flops": C, "sizes": len(at), **m})
        out["minima"][obj] = minima
        out["laws"][obj] = power_law([m["flops"] for m in minima], [m["loss"] for m in minima])
    out["gap"] = compute_gaps(out["laws"].get("mdm"), out["minima"].get("ar", []), "flops")
    return out


# ----------------------------------------------------------------------------------------------------
# report


def print_table(results: list, fits: dict) -> None:
    print("\nrun                                   N        steps   val nll (nats/token)")
    for r in sorted(results, key=lambda r: (r["objective"], r["flops"], r.get("non_embedding_params", 0))):
        name = f"{r['objective']:3s} {r['size']:16s} C={r['flops']:.3g}"
        if "val_nll" in r:
            print(f"{name:34s} {r['non_embedding_params']:>10,} {r['steps']:>7}   {r['val_nll']:.4f} "
                  f"± {r['val_stderr']:.4f}")
        else:
            print(f"{name:34s} skipped: {r['skipped']}")
    print("\nIsoFLOP minima (loss-optimal size per budget)")
    for obj, minima in fits["minima"].items():
        for m in minima:
            flag = "  (edge of the sizes tried)" if m["edge"] else ""
            print(f"  {obj:3s} C={m['flops']:.3g}: N*={m['n_opt']:,.0f}  L*={m['loss']:.4f}  [{m['fit']}]{flag}")
    for obj, law in fits["laws"].items():
        if law is None:
            print(f"  {obj:3s} power law: needs two budgets or more")
        else:
            print(f"  {obj:3s} L*(C) = {law['A']:.4g} C^-{law['alpha']:.4f}")
    for g in fits["gap"]:
        print(f"  compute gap at C={g['flops']:.3g}: the MDM reaches the ARM's {g['arm_loss']:.4f} at "
              f"C={g['mdm_flops_for_it']:.3g} ({g['ratio']:.1f}x)")
    total = fits.get("total")
    if total:
        print("\nOn total training FLOPs (6N + the output head at the rows it runs on + attention; --flops counts "
              "6N only)")
        for r in sorted(results, key=lambda r: (r["objective"], r["flops"], r.get("non_embedding_params", 0))):
            if "val_nll" in r:
                f = training_flops(r, total["vocab_size"])
                print(f"  {r['objective']:3s} {r['size']:16s} C={r['flops']:.3g}: total {f['total']:.3g} "
                      f"({f['total'] / f['nominal']:.1f}x nominal; head {f['head'] / f['total']:.0%})")
        for obj, front in total["fronts"].items():
            pts = ", ".join(f"{p['flops_total']:.3g}: {p['loss']:.3f}" for p in front)
            law = total["laws"].get(obj)
            fitted = f"; L = {law['A']:.4g} C^-{law['alpha']:.4f}" if law else ""
            print(f"  {obj:3s} front (total FLOPs: loss) {pts}{fitted}")
        for g in total["gap"]:
            print(f"  compute gap at {g['flops_total']:.3g} total FLOPs: the MDM reaches the ARM's "
                  f"{g['arm_loss']:.4f} at {g['mdm_flops_for_it']:.3g} ({g['ratio']:.1f}x)")


def refit(args: argparse.Namespace) -> int:
    """--refit FILE: the fits and the table again from a scaling JSON's runs (no training), e.g. one written
    before `fits.total` existed; the vocabulary from --vocab-size, else the record's, else the data's."""
    try:
        (record,) = json.loads(Path(args.refit).read_text())
        results = record["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"smdm bench scaling: error: --refit {args.refit}: not a scaling JSON ({e})") from None
    vocab = args.vocab_size or record.get("fits", {}).get("total", {}).get("vocab_size")
    if vocab is None:
        from smdm import data as D

        try:
            vocab = D.load_manifest(D.resolve_dataset(record["settings"]["data"], "train")).vocab_size
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"smdm bench scaling: error: --refit: give --vocab-size (the runs' data: {e})") from None
    fits = fit(results)
    fits["total"] = fit_total(results, vocab)
    print_table(results, fits)
    if args.json:
        write_records([{**record, "fits": fits, "refit_of": str(args.refit)}], args.json)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.refit:
        return refit(args)
    from smdm.model import config_by_name

    preset = QUICK if args.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data is None:  # the built-in corpus, as `smdm train` prepares it
        from smdm.train import builtin_data

        args.data = builtin_data()
    # checked before the sweep: run_one records a budget below one step as a skipped run and reuses it later;
    # a missing dataset, a misspelt size or an empty val split must fail now, not after the first training
    if not Path(args.data).is_dir():
        raise SystemExit(f"smdm bench scaling: error: --data {args.data}: no such directory")
    for size in args.sizes:
        try:
            config_by_name(size)
        except ValueError as e:
            raise SystemExit(f"smdm bench scaling: error: --sizes {size}: {e}") from None
    from smdm import data as D

    try:  # every run is scored on the val split: one that cannot fill a window would fail after training
        val = D.load_manifest(D.resolve_dataset(args.data, "val"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"smdm bench scaling: error: --data {args.data}: no validation split ({e})") from None
    if val.num_tokens < args.seq_len + 1:
        raise SystemExit(f"smdm bench scaling: error: --data {args.data}: the validation split has "
                         f"{val.num_tokens} tokens, fewer than one window of --seq-len {args.seq_len} + 1")
    from smdm.benchmarks import set_threads
    from smdm.train import TrainError

    set_threads(args.threads)
    root = Path(args.out)
    t0 = time.perf_counter()
    results = []
    for C in args.flops:
        for size in args.sizes:
            for obj in args.objectives:
                try:  # only a budget below one step is a (cached) skip: anything else stops the sweep
                    results.append(run_one(args, obj, size, C, root))
                except TrainError as e:
                    raise SystemExit(f"smdm bench scaling: error: {obj} {size} C={C:.3g}: {e}") from None
    wall = time.perf_counter() - t0
    fits = fit(results)
    fits["total"] = fit_total(results, D.load_manifest(D.resolve_dataset(args.data, "train")).vocab_size)
    print_table(results, fits)
    print(f"\n{len(args.sizes)} sizes × {len(args.flops)} budgets × {len(args.objectives)} objectives, data "
          f"{args.data}, batch {args.batch_size} × {args.seq_len}, seed {args.seed}, wall {wall:.0f} s; runs in "
          f"{root}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    record = {"bench": "scaling", "settings": settings, "wall_seconds": wall, "runs": results, "fits": fits,
              "environment": environment()}
    if args.json:
        write_records([record], args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--quick", action="store_true", help=f"a ~1 minute smoke run ({QUICK})")
    a("--data", type=Path, default=None, help="`smdm prepare` output with a val split (default: the built-in "
                                              "corpus in runs/data, prepared if missing)")
    a("--sizes", nargs="+", default=None,
      help=f"model sizes: names (19M, demo, ...) or L<layers>-H<heads>-D<width>[-F<ffn>] (default {DEFAULTS['sizes']})")
    a("--flops", nargs="+", type=float, default=None, help=f"compute budgets C (default {DEFAULTS['flops']})")
    a("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES), help="default: both")
    a("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    a("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    a("--lr", type=float, default=None, help="peak learning rate (default: the trainer's for the size)")
    a("--schedule", default=None, help="the MDM's noise schedule (default linear)")
    a("--seed", type=int, default=0)
    a("--val-windows", type=int, default=None, help="validation windows scored per run (default 64)")
    a("--val-samples", type=int, default=None, help="ELBO Monte Carlo samples per window (MDM; default 16)")
    a("--estimator", choices=ELBO_ESTIMATORS, default="time", help="the MDM's ELBO estimator: time (1/t "
      "weights, the paper's; default) or count (LLaDA's, finite variance; smdm.evaluate)")
    a("--threads", type=int, default=None, help="CPU threads of torch and of the Rust core (default: all)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out", default="runs/scaling", help="the runs (checkpoints, result.json each); the same command again "
                                            "reuses the finished ones (default runs/scaling)")
    a("--json", default=None, type=json_out, help="write the settings, every run and the fits here")
    a("--refit", default=None, metavar="FILE", help="no training: the fits and table of a scaling JSON's runs again")
    a("--vocab-size", type=int, default=None, help="--refit: the runs' vocabulary (default: the data's)")
    parser.set_defaults(func=run)
    return parser
