# python benches/train_memory.py [--config 170M] [--seq-len 2048] [--batch 1] [--mask-rate 0.5] [--json OUT]
"""Peak CPU memory of one MDM training step (forward, backward, AdamW step) with the output head computed
only at the masked rows (`smdm.diffusion.mdm_loss`, what the trainer runs) against the plain full-logits loss
(head and cross-entropy over all B·L rows, weights 0 at unmasked tokens). Both compute the same loss value
(checked). Method: each variant runs in a fresh subprocess; peak = `resource.getrusage(RUSAGE_SELF).ru_maxrss`
after the step, and the step's own peak = that minus ru_maxrss right before it (model, gradients and AdamW
state are allocated by a step on a 1-token batch first, so both variants start from the same high-water mark).
The mask is the same in both (fixed seed, every token masked with probability --mask-rate)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_variant(variant: str, config: str, seq_len: int, batch: int, mask_rate: float) -> dict:
    import torch
    import torch.nn.functional as F
    from smdm.diffusion import mdm_loss
    from smdm.model import build_model, config_by_name

    torch.manual_seed(0)
    cfg = config_by_name(config, vocab_size=32000, max_seq_len=max(seq_len, 2048))
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_fn(x0, mask, weight):
        noisy = x0.masked_fill(mask, cfg.mask_id)
        if variant == "masked_rows":
            return mdm_loss(model, noisy, x0, mask, weight)
        logits = model(noisy)  # (B, L, V): the head over every row
        ce = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x0.reshape(-1), reduction="none")
        return (ce * weight.reshape(-1)).sum() / mask.numel()

    def step(B, L):
        g = torch.Generator().manual_seed(1)
        x0 = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
        mask = torch.rand(B, L, generator=g) < mask_rate
        weight = mask.float() / mask_rate
        loss = loss_fn(x0, mask, weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers allocated: same baseline for both
        return float(loss)

    step(1, 1)  # allocate gradients and AdamW state
    before = maxrss_mib()
    t0 = time.perf_counter()
    loss = step(batch, seq_len)
    seconds = time.perf_counter() - t0
    after = maxrss_mib()
    return {"variant": variant, "config": config, "batch": batch, "seq_len": seq_len, "mask_rate": mask_rate,
            "loss": loss, "baseline_mib": before, "peak_mib": after, "step_peak_mib": after - before,
            "seconds": seconds, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="170M")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mask-rate", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(one_variant(a.variant, a.config, a.seq_len, a.batch, a.mask_rate)))
        return 0
    rows = []
    for variant in ("full_logits", "masked_rows"):
        cmd = [sys.executable, __file__, "--variant", variant, "--config", a.config,
               "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--mask-rate", str(a.mask_rate)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
