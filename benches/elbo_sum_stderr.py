# python benches/elbo_sum_stderr.py [--ckpt runs/demo-mdm] [--data runs/data] [--windows 64] [--seq-len 64]
#                                   [--runs 4:count:40 16:count:30 16:time:30 64:count:16 64:time:16] [--json OUT]
"""The standard error of a SUM of ELBO estimates (`smdm eval ppl`, the trainer's validation): is the reported
error the true one? All windows of one seed share their stratified times t_k = (k + 1 - u) / n (one u), so
their Monte Carlo errors are correlated. Each run (n samples, estimator, S seeds) estimates the total ELBO of
--windows validation windows S times (seeds 0..S-1) and compares the spread of the totals over the seeds (the
true error of one estimate) with the root mean square of three reported errors:
  old   the root of the windows' summed squared per-window stderrs (what smdm reported before 2026-11-29:
        assumes independent windows, so it understates);
  iid   std of the per-sample totals / sqrt(n) (counts the trend in t that stratification cancels: overstates);
  sum   `smdm.diffusion.sum_stderr` (residual variance around a linear trend in t, plus the shared offset's
        b^2 / (12 n^2)): what smdm reports now.
Reported per run: spread / error (1 = honest; below 1 conservative, above 1 understated). The spread itself
is an estimate from S seeds (its relative standard error is about 1 / sqrt(2 (S - 1)): 13% at 30 seeds)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))


def run(model, x, seg, idx, n: int, estimator: str, seeds: int) -> dict:
    import numpy as np
    import torch
    from smdm.diffusion import elbo_nll, sum_stderr

    totals, errors = [], {"old": [], "iid": [], "sum": []}
    for seed in range(seeds):
        with torch.no_grad():
            e = elbo_nll(model, x, prompt_lens=[1] * len(x), segment_ids=seg, n_samples=n, seed=seed, row_ids=idx,
                         max_rows=len(x), estimator=estimator)
        s = e.samples.sum(1)  # (n,) per-sample totals over the windows
        totals.append(float(s.mean()))
        errors["old"].append(math.sqrt(float((e.stderr ** 2).sum())))
        errors["iid"].append(float(s.std()) / math.sqrt(n))
        errors["sum"].append(sum_stderr(s, e.times, stratified=e.stratified))
    spread = float(np.std(totals, ddof=1))
    out = {"n_samples": n, "estimator": estimator, "seeds": seeds, "spread": spread}
    for k, v in errors.items():
        rms = math.sqrt(float(np.mean(np.square(v))))
        out[f"{k}_error"], out[f"{k}_ratio"] = rms, spread / rms
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "demo-mdm"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--runs", nargs="+", default=["4:count:40", "16:count:30", "16:time:30", "64:count:16",
                                                  "64:time:16"], help="N_SAMPLES:ESTIMATOR:SEEDS")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import smdm
    import torch
    from smdm.data import PackedDataset

    torch.set_num_threads(args.threads)
    model, _ = smdm.load(args.ckpt, device="cpu")
    ds = PackedDataset(args.data, args.seq_len, args.windows, extra_token=True, shuffle=False, epochs=1, split="val")
    batch = next(iter(ds))
    x, seg, idx = batch["input_ids"], batch["segment_ids"], batch["index"].numpy()
    rows, t0 = [], time.time()
    print(f"{args.windows} windows of {args.seq_len} tokens, {args.ckpt}; spread / reported error (1 = honest)")
    for spec in args.runs:
        n, est, seeds = spec.split(":")
        r = run(model, x, seg, idx, int(n), est, int(seeds))
        rows.append(r)
        print(f"n={r['n_samples']:>3} {r['estimator']:5s} {r['seeds']:>2} seeds: spread {r['spread']:8.1f}  " +
              "  ".join(f"{k} {r[k + '_error']:7.1f} ({r[k + '_ratio']:.2f}x)" for k in ("old", "iid", "sum")),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": args.ckpt, "windows": args.windows, "seq_len": args.seq_len,
                                               "seconds": time.time() - t0, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
