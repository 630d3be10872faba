# python benches/train_memory.py [--config 170M] [--seq-len 2048] [--batch 1] [--mask-rate 0.5] [--json OUT]
# python benches/train_memory.py --activation-checkpointing [--repeats 3] [--steps 2]
# python benches/train_memory.py --chunked-ce [--repeats 3] [--steps 2]
# python benches/train_memory.py --validation [--repeats 3] [--steps 2]
"""Peak CPU memory of one MDM training step (forward, backward, AdamW step) with the output head computed
only at the masked rows (`smdm.diffusion.mdm_loss`, what the trainer runs) against the plain full-logits loss
(head and cross-entropy over all B·L rows, weights 0 at unmasked tokens). Both compute the same loss value
(checked). Method: each variant runs in a fresh subprocess; peak = `resource.getrusage(RUSAGE_SELF).ru_maxrss`
after the step, and the step's own peak = that minus ru_maxrss right before it (model, gradients and AdamW
state are allocated by a step on a 1-token batch first, so both variants start from the same high-water mark).
The mask is the same in both (fixed seed, every token masked with probability --mask-rate).

--activation-checkpointing instead compares the trainer's loss (head at masked rows) without and with
activation checkpointing (`Transformer(activation_checkpointing=True)`, each block recomputed in backward): the
same peak measure, and the step time. Timing: --repeats rounds alternate the two subprocesses (A B A B ...) so
that load from other processes falls on both alike; each subprocess times --steps steps after the measured one
(the same batch; the first step's time is kept too), as wall time and as the process's CPU time (with one
thread, CPU time barely moves when other processes load the machine). Both must compute the same loss
(exactly, on CPU).

--chunked-ce compares the training losses' output head + cross-entropy computed through all rows' logits at once
(`linear_cross_entropy_reference`, forced by SMDM_KERNELS=reference) with `smdm.linear_ce` (chunks of rows,
gradients in the forward pass; what the trainer runs), for the MDM (masked rows) and the ARM twin (every row):
the same peak measure and step times, rounds of the four subprocesses alternating; the losses must agree to 1e-5.
--validation does the same for the trainer's validation ELBO (`elbo_nll` under no_grad, 2 samples per window):
`cross_entropy_rows` against the per-row CE through all masked rows' logits."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


VARIANTS = {  # name -> (objective, head at masked rows only, activation checkpointing)
    "full_logits": ("mdm", False, False), "masked_rows": ("mdm", True, False), "masked_rows_ac": ("mdm", True, True),
    "ar": ("ar", True, False), "val": ("val", True, False)}  # val: the trainer's validation ELBO (no backward)


def one_variant(variant: str, config: str, seq_len: int, batch: int, mask_rate: float, steps: int = 1) -> dict:
    import torch
    import torch.nn.functional as F
    from smdm.diffusion import ar_loss, elbo_nll, mdm_loss
    from smdm.model import build_model, config_by_name

    torch.manual_seed(0)
    objective, masked_rows, recompute = VARIANTS[variant]
    cfg = config_by_name(config, vocab_size=32000, max_seq_len=max(seq_len, 2048) + 1, causal=objective == "ar")
    model = build_model(cfg, seed=0, activation_checkpointing=recompute)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_fn(x0, mask, weight):
        if objective == "ar":  # windows of L + 1 tokens
            return ar_loss(model, torch.cat([x0, x0[:, :1]], dim=1))
        noisy = x0.masked_fill(mask, cfg.mask_id)
        if masked_rows:
            return mdm_loss(model, noisy, x0, mask, weight)
        logits = model(noisy)  # (B, L, V): the head over every row
        ce = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x0.reshape(-1), reduction="none")
        return (ce * weight.reshape(-1)).sum() / mask.numel()

    def step(B, L):
        g = torch.Generator().manual_seed(1)
        x0 = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
        mask = torch.rand(B, L, generator=g) < mask_rate
        weight = mask.float() / mask_rate
        if objective == "val":  # 2 samples of each window in one forward pass, as validation batches them
            return float(elbo_nll(model, x0, n_samples=2, max_rows=2 * B, seed=1).nll.mean())
        loss = loss_fn(x0, mask, weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers allocated: same baseline for both
        return float(loss.detach())

    step(1, 1)  # allocate gradients and AdamW state
    before = maxrss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(batch, seq_len)
    seconds = time.perf_counter() - t0
    after = maxrss_mib()
    times, cpu = [seconds], [time.process_time() - c0]
    for _ in range(steps - 1):  # more steps on the same batch: timing only (the weights move, the peak stays)
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch, seq_len)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"variant": variant, "config": config, "batch": batch, "seq_len": seq_len, "mask_rate": mask_rate,
            "loss": loss, "baseline_mib": before, "peak_mib": after, "step_peak_mib": after - before,
            "seconds": seconds, "step_seconds": times, "step_cpu_seconds": cpu, "threads": torch.get_num_threads()}


def run_child(a, variant: str, steps: int = 1, plain_ce: bool = False) -> dict:
    """One variant in a fresh subprocess; plain_ce: SMDM_KERNELS=reference, the losses through
    `linear_cross_entropy_reference` (all rows' logits at once) instead of the chunked `linear_cross_entropy`."""
    cmd = [sys.executable, __file__, "--variant", variant, "--config", a.config, "--seq-len", str(a.seq_len),
           "--batch", str(a.batch), "--mask-rate", str(a.mask_rate), "--steps", str(steps)]
    env = {**os.environ, "SMDM_KERNELS": "reference" if plain_ce else os.environ.get("SMDM_KERNELS", "auto")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "ce": "plain" if plain_ce else "chunked"}


def head_rows(a) -> list[dict]:
    rows = [run_child(a, variant) for variant in ("full_logits", "masked_rows")]
    full, masked = rows
    assert abs(full["loss"] - masked["loss"]) <= 1e-3 * abs(full["loss"]), (full["loss"], masked["loss"])
    print(f"one MDM training step, {a.config}, batch {a.batch} x {a.seq_len}, vocab 32000, mask rate "
          f"{a.mask_rate}, CPU ({full['threads']} threads); peak RSS (ru_maxrss) in MiB")
    print(f"{'variant':<14}{'baseline':>10}{'peak':>10}{'step peak':>11}{'seconds':>9}")
    for r in rows:
        print(f"{r['variant']:<14}{r['baseline_mib']:>10.0f}{r['peak_mib']:>10.0f}{r['step_peak_mib']:>11.0f}"
              f"{r['seconds']:>9.1f}")
    saved = full["step_peak_mib"] - masked["step_peak_mib"]
    print(f"head at masked rows only saves {saved:.0f} MiB of the step's peak "
          f"({saved / full['step_peak_mib']:.0%}); loss {masked['loss']:.4f} in both")
    return rows


def checkpointing_rows(a) -> list[dict]:
    rows = []
    for _ in range(a.repeats):  # A B A B ...: machine load hits both variants alike
        for variant in ("masked_rows", "masked_rows_ac"):
            rows.append(run_child(a, variant, a.steps))
    plain = [r for r in rows if r["variant"] == "masked_rows"]
    ac = [r for r in rows if r["variant"] == "masked_rows_ac"]
    assert len({r["loss"] for r in rows}) == 1, [r["loss"] for r in rows]  # the same computation
    print(f"one MDM training step (head at masked rows), {a.config}, batch {a.batch} x {a.seq_len}, vocab 32000, "
          f"mask rate {a.mask_rate}, CPU ({rows[0]['threads']} threads), {a.repeats} alternating subprocess "
          f"pairs x {a.steps} steps; peak RSS (ru_maxrss) in MiB")
    print(f"{'activation checkpointing':<26}{'baseline':>10}{'peak':>10}{'step peak':>11}"
          f"{'wall s (median, min-max)':>26}{'CPU s (median, min-max)':>26}")
    summary = {}
    for name, rs in (("off", plain), ("on", ac)):
        wall = sorted(t for r in rs for t in r["step_seconds"])
        cpu = sorted(t for r in rs for t in r["step_cpu_seconds"])
        peak = max(r["step_peak_mib"] for r in rs)
        summary[name] = (peak, statistics.median(wall), statistics.median(cpu))
        print(f"{name:<26}{statistics.median(r['baseline_mib'] for r in rs):>10.0f}"
              f"{max(r['peak_mib'] for r in rs):>10.0f}{peak:>11.0f}"
              f"{f'{summary[name][1]:.1f} ({wall[0]:.1f}-{wall[-1]:.1f})':>26}"
              f"{f'{summary[name][2]:.1f} ({cpu[0]:.1f}-{cpu[-1]:.1f})':>26}")
    (p0, w0, c0), (p1, w1, c1) = summary["off"], summary["on"]
    spread = [max(r["step_peak_mib"] for r in rs) - min(r["step_peak_mib"] for r in rs) for rs in (plain, ac)]
    print(f"step peak with/without: {p1:.0f}/{p0:.0f} MiB = {p1 / p0:.2f} (spread over repeats {spread[0]:.0f} / "
          f"{spread[1]:.0f} MiB); step time with/without (medians): wall {w1 / w0:.2f}x, process CPU time "
          f"{c1 / c0:.2f}x (CPU time is the less load-sensitive one on a shared machine); loss "
          f"{rows[0]['loss']:.4f} in every run")
    return rows


def chunked_ce_rows(a) -> list[dict]:
    """The training losses' head + CE through all rows' logits at once (plain) against `smdm.linear_ce` (chunked),
    for the MDM (masked rows) and the ARM twin (every row): step peak and step time, alternating subprocesses."""
    rows = []
    for _ in range(a.repeats):
        for variant in ("masked_rows", "ar"):
            for plain in (True, False):
                rows.append(run_child(a, variant, a.steps, plain_ce=plain))
    print(f"one training step, {a.config}, batch {a.batch} x {a.seq_len}, vocab 32000, MDM mask rate {a.mask_rate}, "
          f"CPU ({rows[0]['threads']} threads), {a.repeats} alternating subprocess rounds x {a.steps} steps; the "
          f"head + CE through all rows' logits (plain) or smdm.linear_ce (chunked); peak RSS (ru_maxrss) in MiB")
    print(f"{'objective':<10}{'CE':<9}{'step peak':>11}{'wall s (median)':>17}{'CPU s (median)':>16}{'loss':>10}")
    summary = {}
    for variant, name in (("masked_rows", "MDM"), ("ar", "ARM")):
        for ce in ("plain", "chunked"):
            rs = [r for r in rows if r["variant"] == variant and r["ce"] == ce]
            peak = max(r["step_peak_mib"] for r in rs)
            wall = statistics.median(t for r in rs for t in r["step_seconds"])
            cpu = statistics.median(t for r in rs for t in r["step_cpu_seconds"])
            summary[name, ce] = (peak, wall, cpu, rs[0]["loss"])
            print(f"{name:<10}{ce:<9}{peak:>11.0f}{wall:>17.2f}{cpu:>16.2f}{rs[0]['loss']:>10.4f}")
        (p0, w0, c0, l0), (p1, w1, c1, l1) = summary[name, "plain"], summary[name, "chunked"]
        assert abs(l0 - l1) <= 1e-5 * abs(l0), (name, l0, l1)  # the same loss
        print(f"{name}: chunked/plain step peak {p1:.0f}/{p0:.0f} MiB = {p1 / p0:.2f} (saves {p0 - p1:.0f} MiB); "
              f"step time wall {w1 / w0:.2f}x, CPU {c1 / c0:.2f}x")
    return rows


def validation_rows(a) -> list[dict]:
    """The trainer's validation ELBO (`elbo_nll`, no_grad): the head + CE per row through all masked rows'
    logits at once (plain) against `smdm.linear_ce.cross_entropy_rows` (chunked), alternating subprocesses."""
    rows = [run_child(a, "val", a.steps, plain_ce=plain) for _ in range(a.repeats) for plain in (True, False)]
    print(f"validation ELBO (2 samples x {a.batch} windows of {a.seq_len} in one forward pass), {a.config}, vocab "
          f"32000, CPU ({rows[0]['threads']} threads); peak RSS (ru_maxrss) in MiB")
    out = {}
    for ce in ("plain", "chunked"):
        rs = [r for r in rows if r["ce"] == ce]
        out[ce] = (max(r["step_peak_mib"] for r in rs), statistics.median(t for r in rs for t in r["step_seconds"]),
                   rs[0]["loss"])
        print(f"{ce:<9}step peak {out[ce][0]:>7.0f}  wall s (median) {out[ce][1]:.2f}  ELBO {out[ce][2]:.5f}")
    (p0, w0, l0), (p1, w1, l1) = out["plain"], out["chunked"]
    assert abs(l0 - l1) <= 1e-5 * abs(l0), (l0, l1)
    print(f"chunked/plain: step peak {p1 / p0:.2f} (saves {p0 - p1:.0f} MiB), wall {w1 / w0:.2f}x")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="170M")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mask-rate", type=float, default=0.5)
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="compare the trainer's step without / with activation checkpointing (memory and time)")
    ap.add_argument("--chunked-ce", action="store_true",
                    help="compare the losses' head + CE through all rows' logits with smdm.linear_ce (MDM and ARM)")
    ap.add_argument("--validation", action="store_true",
                    help="compare the validation ELBO's per-row CE through all rows' logits with the chunked one")
    ap.add_argument("--repeats", type=int, default=3, help="alternating subprocess pairs (with --activation-...)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (with --activation-...)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)  # the child
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(one_variant(a.variant, a.config, a.seq_len, a.batch, a.mask_rate, a.steps)))
        return 0
    if a.validation:
        rows = validation_rows(a)
    elif a.chunked_ce:
        rows = chunked_ce_rows(a)
    else:
        rows = checkpointing_rows(a) if a.activation_checkpointing else head_rows(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
