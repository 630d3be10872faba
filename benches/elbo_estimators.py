# python benches/elbo_estimators.py [--ckpt runs/demo-mdm] [--data runs/data] [--windows 16] [--seq-len 128]
#                                   [--n-samples 128] [--seeds 16] [--json OUT]
"""The ELBO's two Monte Carlo estimators (`smdm.diffusion.elbo_nll`) on a trained MDM's validation windows:
"time" (every target masked with probability t_k, CE weighed by 1/t_k: the paper's, DESIGN §4) and "count"
(exactly ceil(t_k T) of the T targets masked, weighed by T over that count: LLaDA's). Both estimate the same
ELBO; with the linear schedule the time estimator's variance is infinite, the count estimator's finite.

Each window (L + 1 tokens, token 0 given, as `smdm eval ppl` scores it) is estimated --seeds times with
independent draws (seed s) and --n-samples samples each, by both estimators. Per window: the spread of the
estimates over the seeds (their standard deviation, the true error of one estimate), the median standard error
the estimates report, and their mean. Reported: per estimator the spread and the reported error in nats per
token (medians over windows), spread / reported error (1 = an honest error bar; below 1 conservative), the
fraction of estimates more than 3 reported errors from the window's mean over all estimates of both estimators
(a normal estimate: 0.27%), and the variance ratio time/count (how many times the samples the time estimator
needs for the count estimator's error). The two estimators' grand means must agree within their errors (both
unbiased); the JSON records the difference and its standard error."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))


def windows(data: str, seq_len: int, n: int):
    """The first n validation windows of L + 1 tokens: (ids (n, L+1), segment ids, window ids)."""
    import torch
    from smdm.data import PackedDataset

    ds = PackedDataset(data, seq_len, 1, extra_token=True, shuffle=False, epochs=1, split="val")
    got = list(itertools.islice(iter(ds), n))
    if len(got) < n:
        raise SystemExit(f"{data}: only {len(got)} validation windows of {seq_len + 1} tokens, asked for {n}")
    return (torch.cat([b["input_ids"] for b in got]), torch.cat([b["segment_ids"] for b in got]),
            torch.cat([b["index"] for b in got]).numpy())


def measure(model, x, seg, ids, n_samples: int, seeds: int) -> dict:
    import numpy as np
    from smdm.diffusion import ELBO_ESTIMATORS, elbo_nll

    T = x.shape[1] - 1
    est, se, secs = {}, {}, {}
    for name in ELBO_ESTIMATORS:
        t0 = time.perf_counter()
        runs = [elbo_nll(model, x, prompt_lens=[1] * len(x), segment_ids=seg, n_samples=n_samples, seed=s,
                         row_ids=ids, max_rows=max(64, len(x)), estimator=name) for s in range(seeds)]
        secs[name] = time.perf_counter() - t0
        est[name] = np.stack([r.nll.numpy() for r in runs]) / T  # (seeds, windows), nats per token
        se[name] = np.stack([r.stderr.numpy() for r in runs]) / T
    center = np.mean([est[k].mean(0) for k in est], axis=0)  # (windows,): both estimators' estimates together
    out = {}
    for name in est:
        spread = est[name].std(0, ddof=1)  # (windows,)
        reported = np.median(se[name], axis=0)
        z = np.abs(est[name] - center[None]) / np.maximum(se[name], 1e-300)
        out[name] = {"spread_per_token": float(np.median(spread)),
                     "reported_stderr_per_token": float(np.median(reported)),
                     "spread_over_reported": float(np.median(spread / reported)),
                     "beyond_3_reported_errors": float((z > 3).mean()),
                     "largest_over_window_mean": float(np.max(est[name] / center[None])),
                     "mean_nll_per_token": float(est[name].mean()),
                     "mean_stderr": float(est[name].mean(1).std(ddof=1) / math.sqrt(seeds)),
                     "seconds": round(secs[name], 1)}
    ratio = (est["time"].std(0, ddof=1) / est["count"].std(0, ddof=1)) ** 2
    diff = (est["time"] - est["count"]).mean(1)  # (seeds,): the grand means' difference per seed
    out["variance_ratio_time_over_count"] = {"median": float(np.median(ratio)), "min": float(ratio.min()),
                                             "max": float(ratio.max())}
    out["time_minus_count_per_token"] = {"mean": float(diff.mean()),
                                         "stderr": float(diff.std(ddof=1) / math.sqrt(seeds))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="runs/demo-mdm")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if min(a.windows, a.seq_len, a.n_samples - 1, a.seeds - 1) < 1:
        ap.error("--windows and --seq-len must be >= 1, --n-samples and --seeds >= 2")
    import smdm
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = smdm.load(a.ckpt, device="cpu")
    if model.config.causal:
        ap.error(f"{a.ckpt} is an autoregressive model: its likelihood is exact, there is no ELBO to estimate")
    x, seg, ids = windows(a.data, a.seq_len, a.windows)
    res = {"ckpt": a.ckpt, "data": a.data, "windows": a.windows, "seq_len": a.seq_len, "n_samples": a.n_samples,
           "seeds": a.seeds, "threads": torch.get_num_threads(), "torch": torch.__version__,
           **measure(model, x, seg, ids, a.n_samples, a.seeds)}
    print(f"{a.windows} windows x {a.seq_len} tokens, {a.n_samples} samples, {a.seeds} seeds (nats/token):")
    print(f"  {'':6s} {'mean':>8s} {'spread':>8s} {'reported':>9s} {'spread/rep':>10s} {'>3 rep':>7s} {'max/mean':>8s}")
    for k in ("time", "count"):
        r = res[k]
        print(f"  {k:6s} {r['mean_nll_per_token']:8.4f} {r['spread_per_token']:8.4f} "
              f"{r['reported_stderr_per_token']:9.4f} {r['spread_over_reported']:10.2f} "
              f"{100 * r['beyond_3_reported_errors']:6.2f}% {r['largest_over_window_mean']:8.3f}")
    v, d = res["variance_ratio_time_over_count"], res["time_minus_count_per_token"]
    print(f"  variance time / count: median {v['median']:.2f} (windows: {v['min']:.2f} .. {v['max']:.2f}); "
          f"mean time - count {d['mean']:+.4f} ± {d['stderr']:.4f}")
    if a.json:
        from smdm.data import write_atomic

        write_atomic(a.json, (json.dumps(res, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
