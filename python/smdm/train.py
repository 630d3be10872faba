# smdm train            (the CPU demo: prepares the built-in corpus, ~5 minutes, prints samples)
# smdm train --config 170M --data DIR --out DIR ...;  torchrun --nproc_per_node N -m smdm.cli train ...
"""The bundled trainer (DESIGN §6) for the MDM and its autoregressive twin.

- AdamW (0.9, 0.95), weight decay 0.1 on the matrices (Linear weights), none on RMSNorm gains and the token
  embedding; global grad-norm clip 1.0; linear warmup over max(1% of steps, 100) steps (at most 10% of a short
  run) to the peak, cosine down to peak/10. bf16 autocast on CUDA (`--precision`: bf16 on a CPU too, or fp32); gradient
  accumulation; compute-budget mode.
- `--activation-checkpointing` recomputes each block in backward (`Transformer.activation_checkpointing`):
  activation memory of one block instead of all, for about one more forward pass; the same losses and weights.
- `--attention auto|sdpa|flex` (`Transformer.attention`, smdm.model's docstring): "flex" runs the document-masked
  attention of packed windows through FlexAttention's block-sparse kernel instead of SDPA with a dense mask
  (CUDA only: FlexAttention has no CPU backward). Like checkpointing a run option: saved with the run's
  settings, free to change on --resume (the same math, other rounding).
- `--batch-size` is the GLOBAL batch of an optimizer step; it is split over ranks (rank-major) and then over
  accumulation micro-steps, and each micro-batch masks with `sample_offset = rank·B_local + micro·B_micro`,
  so masks depend on (seed, step, global sample) only, never on the split.
- Packed windows keep their document boundaries: the reader's `segment_ids` go to the model (attention stays
  inside a document). RoPE positions are not reset at document starts (as in SMDM): with attention confined to
  a document only position differences matter, so a reset would change nothing but rounding.
- A step whose loss or gradient norm is not finite is skipped: the gradients are dropped before the optimizer
  sees them, so neither the weights nor the optimizer state nor a checkpoint ever holds a non-finite value.
- SIGTERM (and a first Ctrl-C) finishes the current step, saves a checkpoint and exits 0. Resume restores
  weights, optimizer, schedule, RNG and the data position in O(1); on CPU it is bit-exact. Another --lr / --warmup
  (or min_lr_ratio, weight_decay, grad_clip) is an error; another --max-steps re-plans the cosine, with a note.
- An --out that holds checkpoints, the demo's runs/demo-mdm included, needs --resume or --overwrite.
- Distributed: the same command under `torchrun` (DDP; FSDP2 `fully_shard` with `--fsdp`).
- `--init-from CKPT` starts from a checkpoint's weights, model config, objective and tokenizer (a fresh
  optimizer, schedule and data position; `--resume` is the way to continue a run).
- `--tensorboard [DIR]` (default OUT/tensorboard): rank 0 also writes every metrics.jsonl number as a TensorBoard
  scalar against the global step (train/<key>, val/<key>) and the run's settings as text; a resume hides the events
  logged after its checkpoint (SummaryWriter's purge_step), as it drops those lines of metrics.jsonl.
- SFT (`--sft TRAIN.jsonl [--sft-val VAL.jsonl]`, smdm.sft): rows `prompt + response + EOS` padded with EOS.
  MDM: the forward process with `prompt_lens` (prompts never masked; with `--p-uncond` a sample's prompt is all
  masks as input, CFG training), no random-length crop, `diffusion.sft_loss`; ARM: CE on the response and the
  first EOS. Both normalised per sequence, then averaged. Defaults: 3 epochs, a quarter of the pretraining LR,
  warmup 3% of the steps, cosine to a tenth. Validation: NLL per response token (MDM ELBO, ARM exact).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from smdm import checkpoint as ckpt
from smdm.config import ELBO_ESTIMATORS, TrainConfig
from smdm.model import NAMED_SIZES, TINY_SIZES, ModelConfig, build_model, config_by_name

DEMO_SECONDS = 300.0  # `smdm train` with no step count trains for about five minutes
SFT_EPOCHS = 3  # `smdm train --sft` with no step count
DEMO_DATA = Path("runs/data")
# Debug hook (used by the tests, a real code path): comma-separated steps whose loss is multiplied by NaN.
INJECT_NONFINITE_ENV = "SMDM_INJECT_NONFINITE"
# Debug hook: a directory where each rank appends the window ids it trains on (windows-rank{R}.jsonl).
LOG_WINDOWS_ENV = "SMDM_LOG_WINDOWS"


VERIFY_DATA = ("auto", "full", "headers")
TRAIN_ATTENTION = ("auto", "sdpa", "flex")  # model.attention values that train ("fused" has no backward)
PRECISIONS = ("auto", "bf16", "fp32")  # --precision: bf16 autocast on CUDA only (auto), everywhere, or never
FULL_VERIFY_TOKENS = 1 << 30  # "auto" reads every byte of datasets up to this size at start
# The clock of --time-budget and of the step times (a module global, so a test can run the budget on a fake clock
# whose steps cost exactly what it says; _time_one_step times real work with time.perf_counter itself).
_clock = time.perf_counter


class TrainError(ValueError):
    """Bad input to the trainer (the message says what is wrong and where)."""


class TooFewSteps(TrainError):
    """The step count came out below one (--flops / --max-steps too small for this model and batch)."""


# ----------------------------------------------------------------------------------------------------
# schedule


def warmup_steps(cfg: TrainConfig, max_steps: int) -> int:
    if cfg.warmup is not None:
        return cfg.warmup
    if cfg.sft is not None:  # fine-tuning starts from trained weights: a short warmup (3%, the usual SFT ratio)
        return max(1, math.ceil(0.03 * max_steps))
    return max(1, min(max(math.ceil(0.01 * max_steps), 100), max_steps // 10))


def default_val_every(cfg: TrainConfig, max_steps: int) -> int:
    """--val-every, else min(100, steps / 5): about 6 validations up to 500 steps, then one every 100."""
    return cfg.val_every if cfg.val_every is not None else min(100, max(1, max_steps // 5))


def lr_at(step: int, *, peak: float, warmup: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine to peak·min_ratio at `max_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# distributed


class Dist:
    """rank / world size / device of this process; initialises torch.distributed under torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.world > 1:
            device = f"cuda:{self.local_rank}"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise TrainError(f"--device {device}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {device}: CUDA is not available here (use --device cpu or auto)")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        """In place (and returned). NCCL reduces device tensors only: a CPU tensor (a step's loss and token
        count, validation sums, the step timer) goes to this rank's device and back (untested: no GPUs here)."""
        if self.enabled:
            y = x.to(self.device)
            torch.distributed.all_reduce(y, op=op or torch.distributed.ReduceOp.SUM)
            if y is not x:
                x.copy_(y)
        return x

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Objective(nn.Module):
    """The loss as a module, so DDP / FSDP2 hooks wrap the whole computation (the MDM loss calls
    `model.hidden` and `model.head` on masked rows, not `model.forward`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, kind: str, **kw) -> torch.Tensor:
        from smdm import diffusion

        if kind == "mdm":
            return diffusion.mdm_loss(self.model, **kw)
        if kind == "elbo":  # validation of the MDM: nll (B,), the per-sample estimates (n, B), n_tokens (B,)
            est = diffusion.elbo_nll(self.model, **kw)
            return est.nll, est.samples, est.n_tokens
        if kind == "sft":
            return diffusion.sft_loss(self.model, **kw)
        if kind in ("ar_sft", "ar_sft_nll"):
            from smdm import sft

            return (sft.ar_sft_loss if kind == "ar_sft" else sft.ar_sft_nll)(self.model, **kw)
        return diffusion.ar_loss(self.model, **kw)


# ----------------------------------------------------------------------------------------------------
# data


def _prepare_builtin(out: Path) -> None:
    """The demo data: `smdm prepare --out runs/data` (the built-in corpus, a BPE tokenizer trained on it)."""
    from smdm.data_cli import prepare

    prepare([], out)


def builtin_data() -> Path:
    """runs/data: the built-in corpus as `smdm prepare` writes it, prepared on first use."""
    if not (DEMO_DATA / "train" / "manifest.json").is_file():
        print(f"preparing the built-in corpus into {DEMO_DATA}/ ...", flush=True)
        _prepare_builtin(DEMO_DATA)
    return DEMO_DATA


def resolve_data(cfg: TrainConfig, dist: Dist):
    """(train dataset dir, val dataset dir or None, manifest)."""
    from smdm import data

    if cfg.data is None:
        if dist.rank == 0:
            builtin_data()
        dist.barrier()
        root = DEMO_DATA
    else:
        root = Path(cfg.data)
    if not root.exists():
        raise TrainError(f"--data {root}: no such directory")
    try:
        train_dir = data.resolve_dataset(root, split="train")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TrainError(f"--data {root}: not a dataset (no manifest.json): {e}") from None
    if not (Path(train_dir) / "manifest.json").is_file():
        raise TrainError(f"--data {root}: no manifest.json in {train_dir}")
    val_dir = None
    try:
        val_dir = data.resolve_dataset(root, split="val")
        if Path(val_dir) == Path(train_dir) or not (Path(val_dir) / "manifest.json").is_file():
            val_dir = None
    except (FileNotFoundError, ValueError, OSError):
        val_dir = None
    orphan = data.split_without_manifest(root, "val") if val_dir is None else None
    if orphan is not None:  # not "no validation split": its manifest is missing
        raise TrainError(f"--data {root}: {orphan} holds files but no manifest.json: prepare the data again (or "
                         f"remove {orphan} to train without validation)")
    manifest = data.load_manifest(train_dir)
    return Path(train_dir), (Path(val_dir) if val_dir else None), manifest


def load_init(path) -> tuple[Path, dict, ModelConfig]:
    """--init-from: (step dir, its config.json, its ModelConfig); a run dir means its latest complete step."""
    try:
        step_dir = ckpt.resolve(path)
        ckpt.verify(step_dir)
    except ckpt.CheckpointError as e:
        raise TrainError(f"--init-from: {e}") from None
    conf = ckpt.read_config(step_dir)
    try:
        mc = ModelConfig(**conf["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"--init-from: {step_dir / 'config.json'}: bad model config ({e})") from None
    return step_dir, conf, mc


def _arch(c: ModelConfig) -> tuple:
    return (c.n_layer, c.n_head, c.kv_heads, c.d_model, c.d_ff)


def _size_name(mc: ModelConfig) -> Optional[str]:
    for name in (*NAMED_SIZES, *TINY_SIZES):
        if _arch(config_by_name(name, vocab_size=mc.vocab_size)) == _arch(mc):
            return name
    return None


def resolve_model_choice(cfg: TrainConfig, init) -> TrainConfig:
    """The model size and objective of the run: --config / --objective, else (with --init-from) the
    checkpoint's, else "demo" / "mdm". Given explicitly they must match the checkpoint."""
    objective, config = cfg.objective, cfg.config
    if init is not None:
        step_dir, conf, mc = init
        saved = conf.get("objective") or ("ar" if mc.causal else "mdm")
        if objective is not None and objective != saved:
            raise TrainError(f"--objective {objective} does not match --init-from {step_dir}, an {saved.upper()} "
                             f"checkpoint (objective {saved!r}); leave --objective out to use the checkpoint's")
        name = conf.get("config_name") or _size_name(mc) or "custom"
        if config is not None:
            try:
                asked = config_by_name(config, vocab_size=mc.vocab_size)
            except ValueError as e:
                raise TrainError(f"--config: {e}") from None
            if _arch(asked) != _arch(mc):
                raise TrainError(f"--config {config} (layers, heads, kv heads, width, ffn = {_arch(asked)}) does "
                                 f"not match --init-from {step_dir}, a {name} model ({_arch(mc)}); leave --config "
                                 f"out to use the checkpoint's")
        objective, config = saved, name
    if objective == "ar" and cfg.schedule is not None:
        raise TrainError(f"--schedule {cfg.schedule}: noise schedules are for the MDM; the autoregressive twin "
                         f"has none")
    if objective == "ar" and cfg.stratified:
        raise TrainError("--stratified: it stratifies the MDM's masking times t; the autoregressive twin has none")
    return replace(cfg, objective=objective or "mdm", config=config or "demo", schedule=_schedule(cfg, init))


def _schedule(cfg: TrainConfig, init) -> str:
    """--schedule, else the --init-from checkpoint's (fine-tuning keeps the noise it was trained with), else
    linear; the canonical name (`diffusion.parse_schedule`), so resumes compare equal strings."""
    from smdm import diffusion

    name, where = cfg.schedule, "--schedule"
    if name is None and init is not None:
        name = ckpt.trained_schedule(init[1])
        where = f"--init-from {init[0] / 'config.json'}: train.schedule"
    try:
        return diffusion.parse_schedule(name or "linear").name
    except ValueError as e:
        raise TrainError(f"{where}: {e}") from None


def check_args(cfg: TrainConfig) -> None:
    """The ranges of the numeric options, checked before anything is read, built or deleted (a bad value is a
    clear error, never a traceback deep in the run or a silently odd run)."""

    def need(ok: bool, what: str, value) -> None:
        if not ok:
            raise TrainError(f"{what}, got {value}")

    def finite_positive(x) -> bool:
        return math.isfinite(x) and x > 0

    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out, --overwrite starts it over: give one of them")
    if cfg.force_resume and not cfg.resume:
        raise TrainError("--force-resume only relaxes --resume's checks: give --resume too")
    need(cfg.attention in TRAIN_ATTENTION, f"--attention must be one of {', '.join(TRAIN_ATTENTION)}",
         repr(cfg.attention))
    need(cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}", repr(cfg.precision))
    need(cfg.batch_size >= 1, "--batch-size must be >= 1", cfg.batch_size)
    need(cfg.grad_accum >= 1, "--grad-accum must be >= 1", cfg.grad_accum)
    need(cfg.seq_len >= 1, "--seq-len must be >= 1", cfg.seq_len)
    need(0 <= cfg.seed < 2**64, "--seed must be in [0, 2**64)", cfg.seed)
    if cfg.max_steps is not None:
        need(cfg.max_steps >= 1, "--max-steps must be >= 1", cfg.max_steps)
    if cfg.flops is not None:
        need(finite_positive(cfg.flops), "--flops must be a positive number", cfg.flops)
    if cfg.time_budget is not None:
        need(finite_positive(cfg.time_budget), "--time-budget must be a positive number of seconds",
             cfg.time_budget)
    if cfg.epochs is not None:
        need(finite_positive(cfg.epochs), "--epochs must be > 0", cfg.epochs)
    if cfg.stop_after is not None:
        need(cfg.stop_after >= 1, "--stop-after must be >= 1", cfg.stop_after)
    if cfg.lr is not None:
        need(finite_positive(cfg.lr), "--lr must be a positive number", cfg.lr)
    if cfg.warmup is not None:
        need(cfg.warmup >= 0, "--warmup must be >= 0", cfg.warmup)
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]", cfg.min_lr_ratio)
    need(cfg.weight_decay >= 0, "weight_decay must be >= 0", cfg.weight_decay)
    need(cfg.grad_clip > 0, "grad_clip must be > 0", cfg.grad_clip)
    if cfg.val_every is not None:
        need(cfg.val_every >= 0, "--val-every must be >= 0 (0: never)", cfg.val_every)
    need(cfg.save_every >= 0, "--save-every must be >= 0 (0: only at the end and on SIGTERM)", cfg.save_every)
    need(cfg.val_batches >= 0, "--val-batches must be >= 0", cfg.val_batches)
    if cfg.objective != "ar":  # the MDM's validation ELBO reports a standard error
        need(cfg.val_samples >= 2, "--val-samples must be >= 2 (the ELBO's standard error needs two draws)",
             cfg.val_samples)
    need(cfg.val_estimator in ELBO_ESTIMATORS, f"--val-estimator must be one of {', '.join(ELBO_ESTIMATORS)}",
         repr(cfg.val_estimator))
    if cfg.threads is not None:
        need(cfg.threads >= 1, "--threads must be >= 1", cfg.threads)
    if isinstance(cfg.tensorboard, str):
        need(cfg.tensorboard != "", "--tensorboard DIR must not be empty", repr(cfg.tensorboard))


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter for --tensorboard, imported only then: the tensorboard package is an
    optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainError(
            f"--tensorboard needs the tensorboard package ({e}): pip install 'smdm[tensorboard]'"
        ) from None
    return SummaryWriter


def require_matplotlib(what: str = "--plot") -> None:
    """matplotlib is optional (the `plot` extra): checked before a run starts, not after it has trained."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise TrainError(f"{what} needs matplotlib ({e}): pip install 'smdm[plot]'") from None


def check_sft_args(cfg: TrainConfig) -> None:
    """Options that only make sense with --sft, and --sft's own ranges (before any file is read)."""
    from smdm.sft import FORMATS

    if cfg.sft is None:
        given = [f"--{k.replace('_', '-')}" for k, v in (("sft_val", cfg.sft_val), ("tokenizer", cfg.tokenizer),
                                                          ("prompt_field", cfg.prompt_field),
                                                          ("response_field", cfg.response_field)) if v is not None]
        given += ["--p-uncond"] if cfg.p_uncond else []
        given += ["--sft-format"] if cfg.sft_format != "plain" else []
        if given:
            raise TrainError(f"{', '.join(given)} need --sft (supervised fine-tuning on a JSONL file)")
    else:
        if cfg.data is not None:
            raise TrainError("--sft and --data exclude each other (SFT reads (prompt, response) pairs from JSONL)")
        if cfg.sft_format not in FORMATS:
            raise TrainError(f"--sft-format must be one of {FORMATS}, got {cfg.sft_format!r}")
    if not 0 <= cfg.p_uncond <= 1:
        raise TrainError(f"--p-uncond must be in [0, 1], got {cfg.p_uncond}")
    if cfg.p_uncond > 0 and cfg.objective == "ar":
        raise TrainError("--p-uncond (CFG training: prompts replaced by masks) is for the MDM; the ARM has no "
                         "mask token")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise TrainError(f"--epochs must be > 0, got {cfg.epochs}")


# ----------------------------------------------------------------------------------------------------
# the run


class TimeBudget:
    """--time-budget as a deadline, not only a step count. The step count planned from one timed step before the
    run is re-planned after every step from the median of the recent steps (and the last validation's time), so a
    machine that gets loaded (or faster) after the timing moves the end of the run instead of overshooting the
    budget. It shrinks by more than 1% of its steps (or to stop at once) at any time; it grows by more than 5%
    (the timed step ran slower than the real ones: a cold machine, the first passes' allocations) only in the first
    half of the run, while the cosine's learning rate is still near its peak, so a late re-plan never sends a nearly
    annealed learning rate back up. The margins keep the noise of the step times from moving it back and forth."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = _clock()  # the budget counts the timing and the first validation too
        self.planned = 0
        self.step_times: collections.deque = collections.deque(maxlen=50)
        self.val_time = 0.0
        self.said: Optional[int] = None  # the last plan the trainer printed

    def left(self) -> float:
        return self.seconds - (_clock() - self.start)

    def step_time(self) -> float:
        return float(np.median(self.step_times))

    def replan(self, step: int, max_steps: int, val_every: int) -> int:
        """The last step that fits in what is left of the budget (max_steps when it needs no change)."""
        if len(self.step_times) < 3 or step >= max_steps:
            return max_steps
        st, vt = self.step_time(), self.val_time if val_every else 0.0
        fits = math.floor((self.left() - vt) / (st + vt / max(val_every, 1)))  # the last step validates too
        new = step + max(0, fits)
        if new <= step or new < max_steps - max(1, 0.01 * max_steps):
            return new
        if new > max_steps + max(1, 0.05 * max_steps) and 2 * step <= max_steps:
            return new
        return max_steps


def _check_out_dir(out: Path) -> None:
    """--out must be a run directory (or one that can be created), not a file, nor one of a run's checkpoints:
    a run written into RUN/step-N nests its checkpoints there, and RUN's keep-last-N later deletes them."""
    if (out / ckpt.MANIFEST).is_file():
        raise TrainError(f"--out {out} is a checkpoint of the run {out.parent}, not a run directory: "
                         f"`--out {out.parent} --resume` continues that run from its latest checkpoint, "
                         f"`--init-from {out}` starts a new run (another --out) from this one")
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise TrainError(f"--out {out}: {p} is a file, not a directory")


def _check_tensorboard_dir(tb: Path) -> None:
    """--tensorboard DIR must be a directory or one that can be created, checked with the other options:
    SummaryWriter makes it only once the run has started (--out created, the data set up, the progress bar
    drawn), where a file in its place ended the run with a bare "File exists" / "Not a directory"."""
    p = tb
    while not (p.exists() or p.is_symlink()) and p != p.parent:  # the nearest part that exists
        p = p.parent
    if not p.is_dir():  # a file, or a link to nowhere
        raise TrainError(f"--tensorboard {tb}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        what = "" if p == tb else f" (where {tb} would be created)"
        raise TrainError(f"--tensorboard {tb}: {p} is not writable{what}")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        init = load_init(cfg.init_from) if cfg.init_from is not None else None
        schedule_given = cfg.schedule is not None
        cfg = resolve_model_choice(cfg, init)
        if cfg.objective not in ("mdm", "ar"):
            raise TrainError(f"--objective must be 'mdm' or 'ar', got {cfg.objective!r}")
        check_args(cfg)
        # on every rank (they fail alike) before anything is read, built or deleted; rank 0 writes (fit)
        self._summary_writer = summary_writer_class() if cfg.tensorboard else None
        if cfg.plot:
            require_matplotlib()
        self.cfg = cfg
        self.kind = cfg.objective
        self.sft = cfg.sft is not None
        self.init_dir = init[0] if init is not None else None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out or f"runs/{'sft' if self.sft else 'demo'}-{cfg.objective}")
        _check_out_dir(self.out)
        self.tensorboard_dir = None
        if cfg.tensorboard:
            self.tensorboard_dir = self.out / "tensorboard" if cfg.tensorboard is True else Path(cfg.tensorboard)
            _check_tensorboard_dir(self.tensorboard_dir)
        self.dist = Dist(cfg.device)
        d = self.dist
        if cfg.fsdp and not d.enabled:
            # FSDP2 shards over torchrun's processes: one process trains the plain model. The checkpoint (and
            # TensorBoard's settings) record what ran; fsdp is no part of run_identity, so a resume may change it.
            print("note: --fsdp has no effect in a single process (world size 1: torchrun starts several); "
                  "training without it", file=sys.stderr, flush=True)
            self.cfg = cfg = replace(cfg, fsdp=False)
        if cfg.attention == "flex" and d.device.type != "cuda":
            raise TrainError(f"--attention flex trains on CUDA only (PyTorch's FlexAttention has no backward on "
                             f"the {d.device.type}); use --attention sdpa or auto here")
        # bf16 autocast (weights, gradients and AdamW stay float32): the default on CUDA, asked for elsewhere
        self.autocast_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
        per_rank, rem = divmod(cfg.batch_size, d.world * cfg.grad_accum)
        if rem or per_rank < 1:
            raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by world size {d.world} × "
                             f"--grad-accum {cfg.grad_accum}")
        self.micro = per_rank  # sequences per micro-batch on this rank
        self.local_batch = per_rank * cfg.grad_accum
        if cfg.keep < 2:
            raise TrainError(f"--keep must be >= 2, got {cfg.keep}")
        if init is None:
            try:
                self.model_config = config_by_name(cfg.config, vocab_size=2, causal=self.kind == "ar")
            except ValueError as e:
                raise TrainError(f"--config: {e}") from None
        check_sft_args(cfg)

        resume_dir = None
        existing = ckpt.step_dirs(self.out)
        if existing and not cfg.resume and init is not None and init[0].parent.resolve() == self.out.resolve():
            raise TrainError(f"--init-from {init[0]} lies in --out {self.out}, whose checkpoints a fresh run "
                             f"deletes: write the new run to another --out")
        # The demo's default out (runs/demo-mdm) is no exception: a second `smdm train` used to delete a finished
        # demo run without a word.
        if existing and not cfg.resume and not cfg.overwrite:
            raise TrainError(f"{self.out} already holds checkpoints (latest {existing[-1][1].name}); pass --resume "
                             f"to continue it, --overwrite to start over (deletes them), or --out DIR for a new run")
        # deleted when the run starts (fit), once everything else has been checked: a bad option or a typo in
        # a path must not cost the old checkpoints without a new run to replace them
        self._old_checkpoints = [p for _, p in existing] if not cfg.resume else []
        if cfg.resume:  # checked before any data work: --resume never silently starts fresh
            try:
                resume_dir = ckpt.resolve(self.out)
                ckpt.verify(resume_dir)
            except ckpt.CheckpointError as e:
                raise TrainError(f"--resume: {e}") from None
            saved_train = ckpt.read_config(resume_dir).get("train") or {}
            if cfg.time_budget is not None:
                # A time budget sizes a NEW run's schedule from one timed step; on a resume it could mean the
                # whole run or only what is left, and either would silently bend the cosine the run is on.
                raise TrainError(f"--time-budget sets the length of a new run; {resume_dir} continues its own "
                                 f"schedule of {saved_train.get('max_steps', '?')} steps: leave --time-budget out "
                                 f"(or change the length with --max-steps / --flops / --epochs, or stop early "
                                 f"with --stop-after)")
            saved = saved_train.get("schedule")
            if saved is not None and not schedule_given:  # a resume keeps the run's noise schedule
                self.cfg = cfg = replace(cfg, schedule=saved)
            # Settings with no command-line flag (an API run may have set them): a value left at its default
            # is the run's own; another one is checked against the run's by _check_optimizer.
            kept = {f: saved_train[f] for f in ("min_lr_ratio", "weight_decay", "grad_clip")
                    if f in saved_train and getattr(cfg, f) == getattr(TrainConfig, f)}
            if kept:
                self.cfg = cfg = replace(cfg, **kept)

        if self.sft:
            vocab = self._load_sft(init)
            self.train_dir = Path(cfg.sft)
            self.val_dir = Path(cfg.sft_val) if cfg.sft_val else None
            self.manifest = None
        else:
            self.train_dir, self.val_dir, self.manifest = resolve_data(cfg, d)
            vocab = int(self.manifest.vocab_size)
            if cfg.vocab_size is not None and cfg.vocab_size != vocab:
                raise TrainError(f"--vocab-size {cfg.vocab_size} does not match the data's vocabulary ({vocab}, "
                                 f"{self.train_dir / 'manifest.json'})")
            self.tokenizer_path = self.manifest.tokenizer_path
        self.data_id = self._data_identity()
        # Every checkpoint gets these bytes: the file may be gone by the next save (SFT from a running pretraining
        # job whose keep-last-N prunes the --init-from step, a moved data directory).
        tok = self.tokenizer_path
        self.tokenizer_bytes = Path(tok).read_bytes() if tok is not None and Path(tok).is_file() else None
        if init is not None:
            mc = init[2]
            if mc.vocab_size != vocab:
                raise TrainError(f"--init-from {init[0]} has vocab_size {mc.vocab_size}, the data has {vocab} "
                                 f"({self.train_dir}: another tokenizer?)")
            if cfg.seq_len > mc.max_seq_len:
                raise TrainError(f"--seq-len {cfg.seq_len} exceeds the context of --init-from {init[0]} "
                                 f"({mc.max_seq_len} positions)")
            self.model_config = mc
        else:
            max_seq = max(cfg.seq_len + 1, 2048 if cfg.config in NAMED_SIZES else 512)
            self.model_config = config_by_name(cfg.config, vocab_size=vocab, causal=self.kind == "ar",
                                               max_seq_len=max_seq)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        # the paper's sizes 4e-4, tiny configs 2e-3; spelled-out sizes (L4-H4-D128-F512) and checkpoints of
        # unknown size by their non-embedding parameters (tiny below 5M, the paper's smallest being 6M);
        # fine-tuning a quarter of that
        large = cfg.config not in TINY_SIZES and self.model_config.non_embedding_params() >= 5_000_000
        default_lr = (4e-4 if large else 2e-3) * (0.25 if self.sft else 1.0)
        self.peak_lr = cfg.lr if cfg.lr is not None else default_lr

        # model, optimizer
        self.model = build_model(self.model_config, seed=cfg.seed,
                                 activation_checkpointing=cfg.activation_checkpointing)
        self.model.attention = cfg.attention
        self.step = 0
        self.tokens_seen = 0
        state = None
        if resume_dir is not None:
            state = self._load_resume(resume_dir)
        elif init is not None:
            weights = ckpt.load_weights(init[0])
            try:  # NaN / inf weights would make every step non-finite (20 skipped steps, then an error)
                ckpt.check_finite(weights, init[0])
            except ckpt.CheckpointError as e:
                raise TrainError(f"--init-from: {e}") from None
            self.model.load_state_dict(weights)
            if d.rank == 0:
                print(f"initialised from {init[0]} ({init[1].get('objective', self.kind).upper()} "
                      f"{cfg.config}, step {init[1].get('step')})", flush=True)
        self.model.to(d.device)
        if cfg.compile:
            for block in self.model.blocks:
                block.compile()
        self.objective = Objective(self.model)
        if d.enabled and cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # Under bf16 autocast the blocks' weights are all-gathered in bf16 (half the bytes of float32; autocast
            # casts them for every matmul anyway) and their gradients reduce-scattered in float32 into the float32
            # shards. Inputs are not cast, so the residual stream stays float32 as without FSDP; the one change
            # in the numbers is the RMSNorm gains' bf16 rounding. Embedding and head (the root) stay float32.
            bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
            for block in self.model.blocks:
                fully_shard(block, **({"mp_policy": bf16} if self.autocast_bf16 else {}))
            fully_shard(self.objective)
            self.wrapped = self.objective
        elif d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [d.device.index] if d.device.type == "cuda" else None
            self.wrapped = DDP(self.objective, device_ids=ids)
        else:
            self.wrapped = self.objective
        self.optimizer = self._make_optimizer()
        if state is not None:
            self._load_optimizer(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])

        # data
        self.val_dataset = None
        if self.sft:
            from smdm.sft import SftDataset

            self.verify_full = True  # every id was checked against the vocabulary when the file was read
            self.dataset = SftDataset(self.train_examples, self.micro, seed=cfg.seed, rank=d.rank,
                                      world_size=d.world, step_batches=cfg.grad_accum)
        else:
            from smdm.data import PackedDataset

            # Full checks read every byte of every shard on every rank at every start: seconds for the demo,
            # hours for a SlimPajama-sized corpus, where `smdm data verify` once is the better place (DESIGN §5).
            if cfg.verify_data not in VERIFY_DATA:
                raise TrainError(f"--verify-data must be one of {VERIFY_DATA}, got {cfg.verify_data!r}")
            self.verify_full = cfg.verify_data == "full" or (cfg.verify_data == "auto"
                                                             and self.manifest.num_tokens <= FULL_VERIFY_TOKENS)
            if d.rank == 0:
                from smdm.data_cli import padding_note

                note = padding_note(str(self.train_dir), self.manifest.num_tokens,
                                    sum(s.padding for s in self.manifest.shards))
                if note:
                    print(note, file=sys.stderr, flush=True)
            if not self.verify_full and d.rank == 0:
                print(f"data: {self.manifest.num_tokens:,} tokens: shard headers and sizes checked at start, token "
                      f"ids per batch (--verify-data full checks every byte; `smdm data verify` once does it too)",
                      flush=True)
            from smdm.errors import SmdmFormatError

            # A corrupt shard (SmdmFormatError / SmdmIOError) or too little data for one batch is the user's
            # input error: a TrainError naming the directory, not a traceback.
            try:
                self.dataset = PackedDataset(self.train_dir, cfg.seq_len, self.micro, extra_token=self.kind == "ar",
                                             seed=cfg.seed, rank=d.rank, world_size=d.world,
                                             verify=self.verify_full)
            except (ValueError, OSError) as e:
                raise TrainError(f"--data {cfg.data or DEMO_DATA}: training split: {e}") from None
            if self.val_dir is not None:
                # Every rank reads the same global validation batches and evaluates its own rows of them, so the
                # validation set (and the ELBO's draws, keyed by window id) is the same for any world size.
                try:
                    self.val_dataset = PackedDataset(self.val_dir, cfg.seq_len, self.micro * d.world,
                                                     extra_token=self.kind == "ar", seed=cfg.seed, shuffle=False,
                                                     verify=self.verify_full)
                except (ValueError, OSError) as e:
                    if isinstance(e, (SmdmFormatError, OSError)):  # a corrupt or unreadable val shard
                        raise TrainError(f"--data {cfg.data or DEMO_DATA}: validation split: {e}") from None
                    if cfg.val_every != 0:  # too small for one batch: fatal only when the run validates
                        raise TrainError(
                            f"--data {cfg.data or DEMO_DATA}: validation split: {e} (validation needs one batch "
                            f"of windows: `smdm prepare` with a larger --val-fraction, a smaller --batch-size / "
                            f"--seq-len, or --val-every 0 to train without validation)") from None
        if self.val_dir is None:
            what = "--sft without --sft-val" if self.sft else f"--data {cfg.data or DEMO_DATA} has no validation split"
            if cfg.val_every:  # asked for, and impossible: an error, not a run that silently never validates
                raise TrainError(f"--val-every {cfg.val_every}: {what} (a val/ dataset beside train/); "
                                 f"`smdm prepare --val-fraction F` makes one, --val-every 0 trains without")
            if cfg.val_every is None and d.rank == 0:
                print(f"note: {what}: training without validation", file=sys.stderr, flush=True)
        if state is not None:
            self.dataset.load_state_dict(state["data"])
        self.deadline: Optional[TimeBudget] = None  # set when the time budget decides the steps
        self.max_steps = self._decide_steps(state)
        self.warmup = warmup_steps(cfg, self.max_steps)
        if state is not None:  # a resume keeps the run's LR schedule (_check_optimizer refused another one)
            saved = state["schedule"]
            self.peak_lr = float(saved["peak_lr"])
            self.warmup = int(saved["warmup"])
            note = self._replan_note(int(saved["max_steps"]))
            if note and d.rank == 0:
                print(note, file=sys.stderr, flush=True)
        self.val_every = default_val_every(cfg, self.max_steps)
        if self.warmup >= self.max_steps and self.max_steps > 1 and d.rank == 0:
            print(f"note: the warmup ({self.warmup} steps) is as long as the run ({self.max_steps}): the learning "
                  f"rate never reaches its peak {self.peak_lr:g}", file=sys.stderr, flush=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.tb_writer = None  # rank 0's SummaryWriter while fit() runs
        self._stop = False
        self.stopped = False  # fit() ended on SIGTERM (the CLI then exits without samples)
        self.nothing_trained = False  # a --resume already at its end: fit() trains nothing (no samples either)
        self.last_checkpoint: Optional[Path] = None  # rank 0: the step dir save() wrote last
        self.mask_id = self.model_config.mask_id
        self.inject = {int(s) for s in os.environ.get(INJECT_NONFINITE_ENV, "").split(",") if s.strip()}
        log_dir = os.environ.get(LOG_WINDOWS_ENV)
        self.window_log = Path(log_dir) / f"windows-rank{d.rank}.jsonl" if log_dir else None

    def _load_sft(self, init) -> int:
        """Tokenizer (the --init-from checkpoint's or --tokenizer) and the SFT files; returns the vocab size."""
        from smdm import sft
        from smdm.data import load_tokenizer, sha256_file
        from smdm.errors import SmdmFormatError

        cfg = self.cfg
        tok_path = None
        if init is not None and (init[0] / "tokenizer.json").is_file():
            tok_path = init[0] / "tokenizer.json"
        if cfg.tokenizer is not None:
            given = Path(cfg.tokenizer)
            if not given.is_file():
                raise TrainError(f"--tokenizer {given}: no such file")
            if tok_path is not None and sha256_file(given) != sha256_file(tok_path):
                raise TrainError(f"--tokenizer {given} differs from {tok_path}, the tokenizer the --init-from model "
                                 f"was trained with; leave --tokenizer out")
            tok_path = given
        if tok_path is None:
            where = f" ({init[0]} holds no tokenizer.json)" if init is not None else ""
            raise TrainError(f"--sft needs a tokenizer: --init-from a checkpoint that has one, or --tokenizer "
                             f"tokenizer.json{where}")
        try:
            # truncation and padding off (they would cut or pad the examples); special tokens written in the
            # texts are text, as in `smdm prepare`'s documents (a quoted `</s>` is no EOS to learn)
            tok = load_tokenizer(tok_path, as_data=True)
        except SmdmFormatError as e:
            raise TrainError(str(e)) from None
        eos = sft.find_eos(tok)
        if eos is None:
            from smdm.generate_cli import EOS_NAMES

            raise TrainError(f"{tok_path}: no EOS token (tried {', '.join(EOS_NAMES)}): SFT ends every answer "
                             f"with it")
        ids = tok.get_vocab(with_added_tokens=True).values()
        tok_vocab = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        if init is not None:
            vocab = init[2].vocab_size
            if tok_vocab > vocab:
                raise TrainError(f"{tok_path} has token ids up to {tok_vocab - 1}, but the model of --init-from "
                                 f"{init[0]} has vocab_size {vocab}")
        else:
            vocab = tok_vocab
        if cfg.vocab_size is not None and cfg.vocab_size != vocab:
            raise TrainError(f"--vocab-size {cfg.vocab_size} does not match the model's vocabulary ({vocab})")
        kw = dict(seq_len=cfg.seq_len, eos_id=eos, vocab_size=vocab, fmt=cfg.sft_format,
                  prompt_field=cfg.prompt_field, response_field=cfg.response_field)
        try:
            self.train_examples = sft.load_examples(cfg.sft, tok, **kw)
            self.val_examples = sft.load_examples(cfg.sft_val, tok, **kw) if cfg.sft_val else None
        except sft.SftDataError as e:
            raise TrainError(str(e)) from None
        if self.dist.rank == 0:
            for ex in (self.train_examples, self.val_examples):
                if ex is not None:
                    print(f"sft: {ex.summary()}", flush=True)
        pf, rf = sft.fields_for(cfg.sft_format, cfg.prompt_field, cfg.response_field)
        self.tokenizer_path = tok_path
        self.eos_id = eos
        self.sft_record = {"train": str(cfg.sft), "val": cfg.sft_val, "format": cfg.sft_format,
                           "prompt_field": pf, "response_field": rf, "p_uncond": cfg.p_uncond,
                           "init_from": None if init is None else str(init[0]), "tokenizer": str(tok_path),
                           "eos_id": eos, "examples": len(self.train_examples),
                           "dropped": self.train_examples.dropped, "seq_len": cfg.seq_len}
        return vocab

    def _data_identity(self) -> str:
        """"sha256:<hex>" of what the reader's saved position indexes: for pretraining the train manifest's
        shards in order (tokens, documents, bytes, CRC-32; not their paths, so a moved dataset still matches),
        dtype, ids and the tokenizer hash; for SFT the training file's bytes and the tokenizer's."""
        import hashlib

        from smdm.data import sha256_file

        if self.sft:
            ident = {"sft": sha256_file(self.cfg.sft), "tokenizer": sha256_file(self.tokenizer_path)}
        else:
            m = self.manifest
            ident = {"format": m.format, "dtype": m.dtype, "vocab_size": m.vocab_size, "eos_id": m.eos_id,
                     "bos_id": m.bos_id, "tokenizer": m.tokenizer_hash,
                     "shards": [[s.num_tokens, s.num_docs, s.bytes, s.crc32] for s in m.shards]}
        return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _decide_steps(self, state) -> int:
        """--max-steps, else --epochs (SFT without a step count: 3), else --flops (C / (6 N tokens per step)),
        else the resumed run's, else --time-budget (the demo: 300 s) divided by the time of one timed step."""
        cfg = self.cfg
        if cfg.max_steps is not None:
            steps = cfg.max_steps
        elif cfg.epochs is not None or (self.sft and state is None and cfg.flops is None
                                        and cfg.time_budget is None):
            epochs = cfg.epochs if cfg.epochs is not None else SFT_EPOCHS
            per_epoch = len(self.dataset) // cfg.grad_accum  # the SFT reader's epoch is whole steps
            steps = math.ceil(epochs * per_epoch)
            if per_epoch < 1:
                raise TrainError(f"an epoch of the training data is less than one optimizer step: "
                                 f"{len(self.dataset)} batches of {self.micro} per rank, --grad-accum "
                                 f"{cfg.grad_accum} (a smaller --batch-size or --seq-len, or more data)")
            if self.dist.rank == 0:
                print(f"{epochs:g} epochs of {per_epoch} steps: {steps} steps", flush=True)
        elif cfg.flops is not None:
            n = self.model_config.non_embedding_params()
            steps = int(cfg.flops // (6 * n * self.tokens_per_step))
        elif state is not None:
            steps = int(state["schedule"]["max_steps"])
        else:
            budget = cfg.time_budget if cfg.time_budget is not None else DEMO_SECONDS
            self.deadline = TimeBudget(budget)
            st = self._time_one_step()
            # a validation costs about a third (forward only) of a step per token it evaluates
            rows = cfg.val_batches * self.micro * (cfg.val_samples if self.kind == "mdm" else 1)
            vt = 0.0 if cfg.val_every == 0 or self.val_dir is None else st * rows / (3 * self.local_batch)

            def cost(n: int) -> float:  # n steps and their validations: step 0, every val_every, the last
                every = default_val_every(cfg, n)
                return n * st + (1 + math.ceil(n / every)) * vt if every else n * st

            # the most steps that fit: below 500 the default val_every makes the cost go up and down (9 steps
            # validate 10 times, 10 steps 6 times), so those are tried one by one; from 500 on it grows with n
            top = max(1, int(budget / st))
            if top > 500 and cost(500) <= budget:
                lo, hi = 500, top
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
                steps = lo
            else:
                steps = next((n for n in range(min(top, 499), 0, -1) if cost(n) <= budget), 1)
            self.deadline.planned = steps
            if self.dist.rank == 0:
                print(f"--time-budget {budget:g} s: {steps} steps (re-planned as the run goes if its steps turn out "
                      f"slower or faster)", flush=True)
        if steps < 1:
            raise TooFewSteps(f"the run has {steps} steps (--max-steps / --flops too small)")
        return steps

    def _time_one_step(self) -> float:
        """Seconds of one optimizer step's forward + backward on random tokens (no update, no data read)."""
        cfg, d = self.cfg, self.dist
        g = torch.Generator().manual_seed(0)
        L = cfg.seq_len + (1 if self.kind == "ar" else 0)
        ids = torch.randint(0, self.model_config.vocab_size, (self.micro, L), generator=g).to(d.device)
        times = []
        for _ in range(2):  # the first pass warms up allocators and kernels
            t0 = time.perf_counter()
            for _ in range(cfg.grad_accum):
                if self.kind == "mdm":
                    mask = torch.rand(ids.shape, generator=g).to(d.device) < 0.5
                    kw = {"noisy": ids.masked_fill(mask, self.model_config.mask_id), "x0": ids, "mask": mask,
                          "weight": mask.float() * 2}
                else:
                    kw = {"tokens": ids}
                with self._autocast():
                    loss = self.wrapped(self.kind, **kw)
                loss.backward()
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        self.optimizer.zero_grad(set_to_none=True)
        t = torch.tensor([times[-1] * 1.15])  # + optimizer, data and logging
        return float(d.all_reduce(t, torch.distributed.ReduceOp.MAX if d.enabled else None))

    # -- state ----------------------------------------------------------------------------------------------
    def run_identity(self) -> dict:
        c = self.cfg
        ident = {"seed": c.seed, "batch_size": c.batch_size, "world_size": self.dist.world,
                 "grad_accum": c.grad_accum, "seq_len": c.seq_len, "objective": self.kind, "config": c.config,
                 "schedule": c.schedule, "stratified": c.stratified}
        if not self.sft:  # SFT rows hold one example each: no document mask
            ident["doc_mask"] = c.doc_mask
        if self.sft:  # what decides the examples, their order and the prompt drops
            r = self.sft_record
            ident["sft"] = {k: r[k] for k in ("format", "prompt_field", "response_field", "p_uncond", "examples")}
        ident["data"] = self.data_id  # the training data the saved reader position indexes
        return ident

    def _load_resume(self, step_dir: Path) -> dict:
        conf = ckpt.read_config(step_dir)
        saved_model = conf.get("model", {})
        if ("sft" in conf) != self.sft:
            raise TrainError(f"--resume: {step_dir} is {'an SFT' if 'sft' in conf else 'a pretraining'} run, this "
                             f"one is {'an SFT' if self.sft else 'a pretraining'} run")
        if conf.get("objective") != self.kind:
            raise TrainError(f"--resume: {step_dir} was trained with --objective {conf.get('objective')}, "
                             f"this run uses {self.kind}")
        if saved_model.get("vocab_size") != self.model_config.vocab_size:
            raise TrainError(f"--resume: {step_dir} has vocab_size {saved_model.get('vocab_size')}, the data "
                             f"has {self.model_config.vocab_size} (a different dataset/tokenizer?)")
        mine = self.model_config.to_dict()
        diff = {k: (saved_model.get(k), v) for k, v in mine.items()
                if saved_model.get(k) != v and k != "max_seq_len"}
        if diff:
            name = conf.get("config_name")
            hint = f"; resume with --config {name}" if name and name != self.cfg.config else ""
            raise TrainError(f"--resume: {step_dir} holds a different model ({diff}; saved, requested: "
                             f"--config {self.cfg.config}){hint}")
        state = ckpt.load_train_state(step_dir)
        # (checkpoints from before these keys existed: linear schedule, i.i.d. t, document masking)
        saved_id = {"schedule": "linear", "stratified": False, "doc_mask": True, **state.get("run", {})}
        mine_id = self.run_identity()
        if "data" not in saved_id:  # checkpoints from before the data identity: unknown, not checked
            del mine_id["data"]
        bad = {k: (saved_id.get(k), v) for k, v in mine_id.items() if saved_id.get(k) != v}
        if bad and not self.cfg.force_resume:
            what = [f"{k} (checkpoint {a}, now {b})" for k, (a, b) in bad.items() if k != "data"]
            if "data" in bad:
                a, b = bad["data"]
                src = f"--sft {self.cfg.sft}" if self.sft else f"--data {self.train_dir}"
                what.append(f"the training data ({src} is not the data the checkpoint was trained on: data "
                            f"identity {b[:19]}…, checkpoint {a[:19]}…; the saved reader position would index "
                            f"other data)")
            raise TrainError("--resume: the run differs from the checkpoint in " + ", ".join(what)
                             + "; pass --force-resume to continue anyway (masks and data order change)")
        self._check_optimizer(step_dir, conf, state)
        weights = ckpt.load_weights(step_dir)
        self.model.load_state_dict(weights)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens", 0))
        if self.dist.rank == 0:
            print(f"resuming from {step_dir} (step {self.step})", flush=True)
        return state

    def _check_optimizer(self, step_dir: Path, conf: dict, state: dict) -> None:
        """--resume continues the run's optimizer and cosine: another peak LR, warmup or final LR ratio made the
        learning rate jump at the resumed step (0.000254 → 0.00171 with --lr 1e-2), and another weight decay or
        clip was silently replaced by the saved optimizer state's or changed the updates. Each is an error naming
        the saved value and the new one; a new length (--max-steps / --flops / --epochs) is allowed, with a note
        (_replan_note). Not relaxed by --force-resume: a new schedule on these weights is a new run (--init-from)."""
        cfg = self.cfg
        sched, saved_train = state.get("schedule") or {}, conf.get("train") or {}
        given = [("--lr", cfg.lr, sched.get("peak_lr")), ("--warmup", cfg.warmup, sched.get("warmup")),
                 ("min_lr_ratio", cfg.min_lr_ratio, sched.get("min_lr_ratio")),
                 ("weight_decay", cfg.weight_decay, saved_train.get("weight_decay")),
                 ("grad_clip", cfg.grad_clip, saved_train.get("grad_clip"))]
        # None: not given (--lr, --warmup: the checkpoint's), or not saved (older checkpoints)
        bad = [f"{name} (checkpoint {old}, now {new})" for name, new, old in given
               if new is not None and old is not None and new != old]
        if bad:
            raise TrainError(f"--resume: the run differs from {step_dir} in {', '.join(bad)}: a resume continues "
                             f"the run's optimizer and learning-rate schedule; give the checkpoint's values (--lr "
                             f"and --warmup can be left out), or start a new run from these weights with "
                             f"--init-from {step_dir} --out DIR")

    def _replan_note(self, old_max: int) -> Optional[str]:
        """The note for a resume with another length (--max-steps / --flops / --epochs): the cosine is stretched
        or shrunk from the resumed step on, so the learning rate there changes; both values from lr_at, the
        schedule the steps use. None when the plan is the same or nothing is left to train (fit says so)."""
        cfg = self.cfg
        if old_max == self.max_steps or self.step >= self._stop_step():
            return None
        if cfg.max_steps is not None:
            given = f"--max-steps {cfg.max_steps}"
        elif cfg.epochs is not None:
            given = f"--epochs {cfg.epochs:g}"
        else:
            given = f"--flops {cfg.flops:g}"
        kw = dict(peak=self.peak_lr, warmup=self.warmup, min_ratio=cfg.min_lr_ratio)
        before, after = lr_at(self.step, max_steps=old_max, **kw), lr_at(self.step, max_steps=self.max_steps, **kw)
        change = f"changes from {before:.4g} to {after:.4g}" if before != after else f"stays {before:.4g}"
        return (f"note: {given}: the cosine is re-planned from {old_max} to {self.max_steps} steps; the learning "
                f"rate of step {self.step + 1}, the first after the checkpoint, {change}")

    def _make_optimizer(self):
        decay, no_decay = [], []
        for name, p in self.objective.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.dist.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.peak_lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)

    def _full_model_state(self) -> dict:
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.objective, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer(self, sd: dict):
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.objective, self.optimizer, self._name_keyed(sd),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(sd)

    def _name_keyed(self, sd: dict) -> dict:
        """An optimizer state keyed by position (`optimizer.state_dict()`: what single-process and DDP runs
        save) keyed by parameter name instead, as `set_optimizer_state_dict` wants it: a DDP run resumed with
        --fsdp. Positions count the parameters of the param groups in order, which this run built alike."""
        groups = sd.get("param_groups") or []
        if not all(isinstance(i, int) for g in groups for i in g["params"]):
            return sd  # already keyed by name (an FSDP run's checkpoint)
        names = {id(p): n for n, p in self.objective.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        if sorted(i for g in groups for i in g["params"]) != list(range(len(order))):
            raise TrainError(f"the checkpoint's optimizer state has {sum(len(g['params']) for g in groups)} "
                             f"parameters, this model {len(order)}")
        return {"state": {order[i]: v for i, v in sd["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}

    def save(self):
        weights = self._full_model_state()
        opt = self._optimizer_state()
        if self.dist.rank == 0:
            if self.tb_writer is not None:  # the events of the checkpoint's steps on disk before it counts
                self.tb_writer.flush()
            train_state = {"step": self.step, "tokens": self.tokens_seen, "optimizer": opt,
                           "schedule": {"peak_lr": self.peak_lr, "warmup": self.warmup,
                                        "max_steps": self.max_steps, "min_lr_ratio": self.cfg.min_lr_ratio},
                           "rng": {"torch": torch.get_rng_state()}, "data": self.dataset.state_dict(),
                           "run": self.run_identity()}
            conf = {"model": self.model_config.to_dict(), "objective": self.kind,
                    "config_name": self.cfg.config,
                    "train": {**self.cfg.to_dict(), "max_steps": self.max_steps}}
            if self.init_dir is not None:
                conf["init_from"] = str(self.init_dir)
            if self.sft:
                conf["sft"] = self.sft_record
            path = ckpt.save(self.out, self.step, model_state=weights, config=conf, train_state=train_state,
                             tokenizer=self.tokenizer_bytes, keep=self.cfg.keep)
            self.last_checkpoint = path
            self.log({"event": "checkpoint", "step": self.step, "path": str(path)})
        self.dist.barrier()

    def log(self, entry: dict):
        if self.dist.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.tb_writer is not None:
                self._log_tensorboard(entry)

    def _log_tensorboard(self, entry: dict):
        """The numbers of a metrics line as scalars at its step: train/<key> for an optimizer step's line (skipped
        as 0 or 1), val/<key> for a validation's. SummaryWriter queues events for a background thread (and with
        tensorflow's gfile or on remote storage buffers them up to flush_secs = 120 s): flushed at each validation
        and before each checkpoint is written (save), so a checkpoint's steps are on disk before it counts."""
        event = entry.get("event")
        if event in (None, "val"):
            group = "train" if event is None else "val"
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):  # bool is an int
                    self.tb_writer.add_scalar(f"{group}/{key}", float(value), entry["step"])
        if event == "val":
            self.tb_writer.flush()

    def _open_tensorboard(self):
        """Rank 0's SummaryWriter, with the run's settings as text at the step this fit starts from. Its
        purge_step makes TensorBoard drop the events an earlier writer logged at or after that step: on a resume
        those after the checkpoint (a crash may have logged some; _rewind_metrics drops the same lines of
        metrics.jsonl), on a fresh run all of them (metrics.jsonl starts empty too)."""
        purge_step = self.step + 1 if self.cfg.resume else 0
        self.tb_writer = self._summary_writer(log_dir=str(self.tensorboard_dir), purge_step=purge_step)
        train = self.cfg.to_dict()  # the options as given, then what the run made of them
        train.update(max_steps=self.max_steps, peak_lr=self.peak_lr, warmup=self.warmup, val_every=self.val_every)
        model = self.model_config.to_dict()
        settings = {"objective": self.kind, "world_size": self.dist.world, "model": model, "train": train}
        text = json.dumps(settings, indent=2, default=str)
        self.tb_writer.add_text("run/settings", "    " + text.replace("\n", "\n    "), self.step)  # a code block

    # -- one optimizer step -------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _check_ids(self, batch):
        """Headers-only verification: a token id the model has no row for is an error naming the windows, not
        an index error deep in the embedding (or, for the mask id, a silently wrong input)."""
        ids = batch["input_ids"]
        bad = ids >= self.model_config.vocab_size
        if bool(bad.any()):
            row = int(bad.any(1).nonzero()[0, 0])
            raise TrainError(f"{self.train_dir}: window {int(batch['index'][row])} holds token id "
                             f"{int(ids[row][bad[row]][0])} >= vocab_size {self.model_config.vocab_size} "
                             f"(run `smdm data verify {self.train_dir}`)")

    def train_step(self, it) -> dict:
        from smdm import diffusion

        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, peak=self.peak_lr, warmup=self.warmup, max_steps=self.max_steps,
                   min_ratio=cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = torch.zeros((), dtype=torch.float64)
        n_tokens = 0
        for m in range(cfg.grad_accum):
            batch = next(it)
            ids = batch["input_ids"]
            if not self.verify_full:
                self._check_ids(batch)
            if self.window_log is not None:  # debug hook: which windows each rank trains on
                with open(self.window_log, "a") as f:
                    f.write(json.dumps({"step": self.step, "index": batch["index"].tolist()}) + "\n")
            seg = batch["segment_ids"] if cfg.doc_mask and not self.sft else None
            last = m == cfg.grad_accum - 1
            sync = nullcontext() if last or not (d.enabled and not cfg.fsdp) else self.wrapped.no_sync()
            kind = self.kind
            if self.sft:
                kind, kw = self._sft_inputs(ids, batch, m)
                n_tokens += ids.numel()
            elif self.kind == "mdm":
                fp = diffusion.forward_process(ids, seed=cfg.seed, step=self.step,
                                               sample_offset=d.rank * self.local_batch + m * self.micro,
                                               global_batch=cfg.batch_size, mask_id=self.mask_id,
                                               stratified=cfg.stratified, schedule=cfg.schedule)
                x0 = ids[:, :fp.length]  # the random-length crop cuts every row of the step alike
                kw = {"noisy": fp.noisy_ids.to(d.device), "x0": x0.to(d.device), "mask": fp.mask.to(d.device),
                      "weight": fp.weight.to(d.device),
                      "segment_ids": None if seg is None else seg[:, :fp.length].to(d.device)}
                n_tokens += x0.numel()
            else:
                kw = {"tokens": ids.to(d.device), "segment_ids": None if seg is None else seg.to(d.device)}
                n_tokens += ids.shape[0] * (ids.shape[1] - 1)
            with sync:
                with self._autocast():
                    loss = self.wrapped(kind, **kw)
                if self.step in self.inject:
                    loss = loss * float("nan")  # debug hook: a non-finite loss must not reach the weights
                (loss / cfg.grad_accum).backward()
            total += loss.detach().double().cpu() / cfg.grad_accum
        stats = torch.stack([total, torch.tensor(float(n_tokens), dtype=torch.float64)])
        d.all_reduce(stats)
        loss_value = float(stats[0]) / d.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:  # drop the gradients: weights and optimizer state stay as they were
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(stats[1])
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                "tokens": self.tokens_seen, "step_tokens": int(stats[1])}

    def _sft_inputs(self, ids, batch, m: int) -> tuple[str, dict]:
        """The loss and its inputs for an SFT micro-batch (DESIGN §4 SFT; smdm.sft's docstring)."""
        from smdm import diffusion

        cfg, d = self.cfg, self.dist
        pl = batch["prompt_lens"]
        if self.kind == "ar":
            return "ar_sft", {"tokens": ids.to(d.device), "prompt_lens": pl.to(d.device),
                              "lengths": batch["lengths"].to(d.device)}
        # Prompts stay clean (and, with probability p_uncond, become all masks as inputs only); the draws are
        # keyed by the global sample index as in pretraining. No random-length crop: it would cut answers
        # and their EOS off.
        fp = diffusion.forward_process(ids, seed=cfg.seed, step=self.step,
                                       sample_offset=d.rank * self.local_batch + m * self.micro,
                                       global_batch=cfg.batch_size, mask_id=self.mask_id, stratified=cfg.stratified,
                                       prompt_lens=pl, p_uncond=cfg.p_uncond, crop_prob=0.0,
                                       schedule=cfg.schedule)
        return "sft", {"noisy": fp.noisy_ids.to(d.device), "x0": ids.to(d.device), "mask": fp.mask.to(d.device),
                       "weight": fp.weight.to(d.device), "prompt_lens": pl.to(d.device)}

    # -- validation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Optional[dict]:
        if self.sft:
            return self._validate_sft()
        if self.val_dataset is None:
            return None

        cfg, d = self.cfg, self.dist
        self.model.eval()
        # FSDP2 gathers the root parameters in the root module forward: go through it (DDP: no sync needed)
        net = self.wrapped if cfg.fsdp and d.enabled else self.objective
        self.val_dataset.load_state_dict({"epoch": 0, "batch": 0})  # the same windows at every validation
        it = iter(self.val_dataset)
        sums = self._val_sums()
        for _ in range(cfg.val_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            mine = slice(d.rank * self.micro, (d.rank + 1) * self.micro)
            ids = batch["input_ids"][mine].to(d.device)
            seg = batch["segment_ids"][mine].to(d.device) if cfg.doc_mask else None
            with self._autocast():
                if self.kind == "mdm":
                    rows = batch["index"][mine].numpy()
                    nll, samples, n = net("elbo", tokens=ids, segment_ids=seg, n_samples=cfg.val_samples,
                                          seed=cfg.seed + 1, row_ids=rows, max_rows=max(64, ids.shape[0]),
                                          schedule=cfg.schedule, estimator=cfg.val_estimator)
                    sums += torch.cat([torch.stack([nll.sum(), n.sum().double()]), samples.sum(1)])
                else:
                    loss = net("ar", tokens=ids, segment_ids=seg).double().cpu()
                    n = ids.shape[0] * (ids.shape[1] - 1)
                    sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        return self._val_event(sums)

    def _val_sums(self) -> torch.Tensor:
        """Validation's running sums: nll, tokens, then (MDM) the per-sample totals of its ELBO draws, whose
        spread gives the standard error of the nll sum (`diffusion.sum_stderr`: every row shares the draws' t)."""
        return torch.zeros(2 + (self.cfg.val_samples if self.kind == "mdm" else 0), dtype=torch.float64)

    def _val_event(self, sums: torch.Tensor) -> Optional[dict]:
        """Reduce `_val_sums` over ranks into the logged val event."""
        from smdm.diffusion import elbo_times, sum_stderr

        self.dist.all_reduce(sums)
        self.model.train()
        if sums[1] == 0:
            return None
        if self.kind == "mdm":  # validation's draws: elbo_nll's default stratified times of seed + 1
            times = torch.from_numpy(elbo_times(self.cfg.val_samples, self.cfg.seed + 1))
            stderr = sum_stderr(sums[2:], times, stratified=True) / float(sums[1])
        else:
            stderr = 0.0
        return {"event": "val", "step": self.step, "tokens": self.tokens_seen,
                "val_loss": float(sums[0] / sums[1]), "val_stderr": stderr,
                "val_tokens": int(sums[1]), "val_kind": "elbo" if self.kind == "mdm" else "exact",
                **({"val_estimator": self.cfg.val_estimator} if self.kind == "mdm" else {})}

    @torch.no_grad()
    def _validate_sft(self) -> Optional[dict]:
        """NLL per response token (response + first EOS) on the first val_batches global batches of --sft-val,
        in file order: the ARM's exact -log p, the MDM's Monte Carlo ELBO (prompt clean, every position after it
        masked, EOS padding included, as trained; draws keyed by example id, so the same for any world size)
        with its standard error. Both are divided by the response tokens (+ first EOS) they score, the same count
        and so directly comparable, except that with an empty prompt the ARM cannot score the first token (no
        BOS): its count is then one less per example (the MDM's is an upper bound that also pays for the
        padding)."""
        ex = self.val_examples
        if ex is None:
            return None
        cfg, d = self.cfg, self.dist
        self.model.eval()
        net = self.wrapped if cfg.fsdp and d.enabled else self.objective
        gb = self.micro * d.world
        sums = self._val_sums()  # nll, target tokens, (MDM) per-sample totals
        for first in range(0, min(len(ex), cfg.val_batches * gb), gb):
            # every rank runs `micro` rows (FSDP needs all ranks in every forward); rows past the end are
            # copies of example 0 that count for nothing
            idx = first + d.rank * self.micro + np.arange(self.micro)
            valid = torch.from_numpy(idx < len(ex))
            batch = ex.rows(np.where(idx < len(ex), idx, 0))
            ids, pl = batch["input_ids"].to(d.device), batch["prompt_lens"]
            n = (batch["lengths"] - pl).double() * valid
            with self._autocast():
                if self.kind == "mdm":
                    nll, samples, _ = net("elbo", tokens=ids, prompt_lens=pl.to(d.device),
                                          n_samples=cfg.val_samples, seed=cfg.seed + 1,
                                          row_ids=batch["index"].numpy(), max_rows=max(64, ids.shape[0]),
                                          schedule=cfg.schedule, estimator=cfg.val_estimator)
                    totals = (samples.double().cpu() * valid).sum(1)
                else:  # divided by the targets it scores: with an empty prompt the first token has no
                    # prediction (no BOS), and counting it anyway biased the per-token NLL low
                    nll, scored = net("ar_sft_nll", tokens=ids, prompt_lens=pl.to(d.device),
                                      lengths=batch["lengths"].to(d.device))
                    totals = torch.zeros(0, dtype=torch.float64)
                    n = scored.double().cpu() * valid
            sums += torch.cat([torch.stack([(nll.double().cpu() * valid).sum(), n.sum()]), totals])
        return self._val_event(sums)

    # -- the loop -------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self._stop = True
        self._stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once (no save)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.dist.rank == 0:
                print("\nCtrl-C: finishing the step, then saving (Ctrl-C again to stop without saving)",
                      file=sys.stderr, flush=True)

    def _rewind_metrics(self):
        """On resume, drop metric lines logged after the checkpoint (a crash may have left some)."""
        if self.dist.rank != 0 or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        from smdm.data import write_atomic

        write_atomic(self.metrics_path, "".join(x + "\n" for x in kept).encode())  # a kill keeps the old file

    def _stop_step(self) -> int:
        """The step fit() stops after: the schedule's end, or --stop-after when it comes first."""
        stop_after = self.cfg.stop_after
        return min(self.max_steps, stop_after) if stop_after is not None else self.max_steps

    def _replanned(self, new_max: int, bar) -> int:
        """The time budget moved the run's last step to `new_max`: the cosine now ends there (a warmup longer than
        the new plan allows ends at once). Returns the new stop step."""
        old = self.max_steps
        self.max_steps = new_max
        if self.cfg.warmup is None and new_max < old:  # a re-plan never lengthens the warmup: its rise is not redone
            self.warmup = min(self.warmup, max(warmup_steps(self.cfg, new_max), min(self.warmup, self.step)))
        stop_at = self._stop_step()
        bar.total = stop_at
        said = self.deadline.said
        if self.dist.rank == 0 and (said is None or abs(new_max - said) > 0.1 * said):  # not every small move
            self.deadline.said = new_max
            bar.write(f"--time-budget: steps take {self.deadline.step_time():.3g} s now: the run ends at step "
                      f"{new_max} instead of {old} ({self.deadline.left():.0f} s left)")
        return stop_at

    def fit(self) -> dict:
        cfg, d = self.cfg, self.dist
        if d.rank == 0:
            if self._old_checkpoints:
                print(f"starting over in {self.out}: deleting {len(self._old_checkpoints)} old checkpoint(s)",
                      flush=True)
                for p in self._old_checkpoints:
                    ckpt.discard(p)
            self._old_checkpoints = []
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                self._rewind_metrics()
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
        d.barrier()
        stop_at = self._stop_step()
        if self.step >= stop_at:  # only a resume starts past step 0
            if d.rank == 0:
                if cfg.stop_after is not None and cfg.stop_after <= self.max_steps:
                    end, more = f"--stop-after {cfg.stop_after}", "a larger --stop-after"
                elif cfg.max_steps is not None:
                    end, more = f"--max-steps {cfg.max_steps}", "a larger --max-steps"
                else:
                    end, more = f"the end of its {self.max_steps}-step schedule", "--max-steps"
                print(f"smdm train: {self.out} is already at step {self.step} >= {end}: nothing trained, the "
                      f"checkpoint is unchanged (give {more} to train further)", flush=True)
            self.nothing_trained = True
            return {"step": self.step, "val": None}
        # SIGTERM and Ctrl-C finish the step and save (Ctrl-C lost the steps since the last save), a second
        # Ctrl-C interrupts. Python takes signal handlers in its main thread only: a run in another thread
        # (a notebook's worker, a server) leaves the signals to that program
        handle = threading.current_thread() is threading.main_thread()
        if handle:
            old = signal.signal(signal.SIGTERM, self._on_sigterm)
            old_int = signal.signal(signal.SIGINT, self._on_sigterm)
        self._stop_signal = "SIGTERM"
        if d.rank == 0:
            n = self.model_config.non_embedding_params()
            what = f"{self.kind.upper()} {cfg.config}" + (" SFT" if self.sft else "")
            print(f"smdm train: {what} ({n / 1e6:.2f}M non-embedding params, vocab "
                  f"{self.model_config.vocab_size}), {self.max_steps} steps × {self.tokens_per_step} tokens, "
                  f"world {d.world}, device {d.device}, out {self.out}", flush=True)
        from tqdm import tqdm

        bar = tqdm(total=stop_at, initial=self.step, disable=d.rank != 0, dynamic_ncols=True, mininterval=1.0)
        it = iter(self.dataset)
        self.model.train()
        last_val = rec = None
        skipped_in_row = 0
        try:
            if self.tensorboard_dir is not None and d.rank == 0:
                self._open_tensorboard()
            if self.step == 0 and self.val_every:
                t_val = _clock()
                last_val = self.validate()
                if self.deadline is not None:
                    self.deadline.val_time = _clock() - t_val
                if last_val:
                    self.log(last_val)
            while self.step < stop_at:
                t0 = _clock()
                rec = self.train_step(it)
                dt = _clock() - t0
                rec["tokens_per_s"] = rec.pop("step_tokens") / dt
                self.log(rec)
                skipped_in_row = skipped_in_row + 1 if rec["skipped"] else 0
                if skipped_in_row >= 20:  # the weights are untouched since the last finite step
                    raise TrainError(f"the run diverged: 20 steps in a row had a non-finite loss or gradient "
                                     f"(step {self.step}); none reached the weights. Try a lower --lr or a "
                                     f"longer --warmup, or check the data")
                bar.update(1)
                self._show(bar, rec, last_val, refresh=False)
                # one reduction agrees on SIGTERM (max) and on the time budget's new last step (min over ranks)
                plan = 0
                if self.deadline is not None:  # a step's whole cost: train step, logging, the progress bar
                    self.deadline.step_times.append(_clock() - t0)
                    plan = self.deadline.replan(self.step, self.max_steps, self.val_every)
                agreed = torch.tensor([1.0 if self._stop else 0.0, -float(plan)], dtype=torch.float64)
                agreed = d.all_reduce(agreed, torch.distributed.ReduceOp.MAX if d.enabled else None)
                stop = bool(agreed[0] > 0)
                if self.deadline is not None and int(-agreed[1]) != self.max_steps:
                    stop_at = self._replanned(int(-agreed[1]), bar)
                done = self.step >= stop_at
                # on SIGTERM save at once (a preemption's grace period is short): no validation first
                if self.val_every and not stop and (self.step % self.val_every == 0 or done):
                    t_val = _clock()
                    last_val = self.validate()
                    if self.deadline is not None:
                        self.deadline.val_time = _clock() - t_val
                    if last_val:
                        self.log(last_val)
                    self._show(bar, rec, last_val, refresh=True)
                if done or stop or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
                if stop:
                    self.stopped = True
                    if d.rank == 0:
                        print(f"\n{self._stop_signal}: saved step {self.step}, exiting", flush=True)
                    break
        finally:
            bar.close()
            if handle:
                signal.signal(signal.SIGTERM, old)
                signal.signal(signal.SIGINT, old_int)
            if self.tb_writer is not None:
                self.tb_writer.close()
                self.tb_writer = None
        if self.deadline is not None and d.rank == 0:
            print(f"--time-budget {self.deadline.seconds:g} s: {self.step} steps in "
                  f"{self.deadline.seconds - self.deadline.left():.0f} s (first plan: {self.deadline.planned})",
                  flush=True)
        if d.rank == 0:
            print(self._summary(rec, last_val), flush=True)
        return {"step": self.step, "val": last_val}

    @staticmethod
    def _show(bar, rec: dict, val: Optional[dict], refresh: bool) -> None:
        """The progress bar's fields: the last step's loss and speed and the latest validation's loss, set again
        when a validation finishes (else the bar showed the one before it, and never the last one)."""
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        val=f"{val['val_loss']:.3f}" if val else "-", refresh=refresh)

    def _summary(self, rec: dict, val: Optional[dict]) -> str:
        """The line fit() ends with, below the closed progress bar: the final step, the last step's loss, the
        last validation (its step: a SIGTERM stops without one) and where the checkpoint is."""
        if val is None:
            seen = "no validation"
        else:
            per = "response token" if self.sft else "token"
            what = "MDM ELBO, an upper bound on the NLL" if self.kind == "mdm" else "ARM NLL, exact"
            err = f" ± {val['val_stderr']:.3f}" if self.kind == "mdm" else ""
            seen = f"val {val['val_loss']:.4f}{err} nats/{per} ({what}; step {val['step']})"
        saved = self.last_checkpoint if self.last_checkpoint is not None else "none"
        return (f"smdm train: step {self.step} of {self.max_steps}: train loss {rec['loss']:.4f}, {seen}; "
                f"checkpoint {saved}")


# ----------------------------------------------------------------------------------------------------
# samples, plots, CLI


def print_samples(model, tokenizer, n: int, kind: str, seed: int = 0):
    """n prompts, each decoded twice: greedy (MDM: low_confidence, one token per step; ARM: left to right) and
    sampled at temperature 1 (MDM: ancestral, the reverse process itself). Prompt i draws with seed + i: the
    sampler's noise is keyed by (seed, step, position, token), so prompts of one length would share it."""
    prompts_text = ["def ", "import os\n", "class ", "    return "][:n]
    if tokenizer is None:
        print("(no tokenizer in the data: no samples)")
        return
    try:
        from smdm.sampling import generate
    except ImportError as e:
        print(f"(samples skipped: smdm.sampling is not available: {e})")
        return
    prompts = [tokenizer.encode(p).ids for p in prompts_text]
    if kind == "mdm":  # (title, sampler, temperature)
        runs = [("low_confidence, 64 steps, temperature 0", "low_confidence", 0.0),
                ("ancestral, 64 steps, temperature 1", "ancestral", 1.0)]
    else:  # the ARM decodes left to right whatever the sampler name
        runs = [("greedy, left to right, temperature 0", "low_confidence", 0.0),
                ("left to right, temperature 1", "low_confidence", 1.0)]
    seeds = [seed + i for i in range(len(prompts))]
    for title, sampler, temperature in runs:
        print(f"\n---- samples ({kind}, {title}, 64 tokens) ----")
        out = generate(model, prompts, gen_length=64, steps=64, sampler=sampler, temperature=temperature, seed=seeds)
        for text, toks in zip(prompts_text, out.tokens):
            print(repr(text + tokenizer.decode(toks)))
    if kind == "mdm":
        print("(A few CPU minutes make a weak MDM: it needs several times its ARM twin's compute for the same "
              "likelihood, and greedy decoding of a weak model repeats its most frequent tokens; the temperature-1 "
              "samples show what it has learned. README: 'What the demo shows'.)")


def print_sft_samples(model, tokenizer, examples, n: int, eos_id: int, seed: int = 0):
    """Greedy answers to the first n prompts of the SFT validation (else training) file."""
    from smdm.sampling import generate

    idx = np.arange(min(n, len(examples)))
    prompts = [examples.tokens[examples.offsets[i]:examples.offsets[i] + examples.prompt_lens[i]].tolist()
               for i in idx]
    gen = max(1, min(128, examples.seq_len - max(len(p) for p in prompts)))
    out = generate(model, prompts, gen_length=gen, steps=gen, sampler="low_confidence", temperature=0.0,
                   seed=seed, eos_id=eos_id)
    print(f"\n---- SFT samples ({examples.path}, greedy, up to {gen} tokens) ----")
    for p, toks in zip(prompts, out.tokens):
        print(repr(tokenizer.decode(p)), "->", repr(tokenizer.decode(toks, skip_special_tokens=True)))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: no metrics (is {run_dir} a training run?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:  # e.g. a line cut off by a crash (--resume drops it)
            raise TrainError(f"{path}: line {i} is not JSON ({e.msg} at column {e.colno})") from None
    return rows


def plot_runs(runs: list, png) -> Path:
    """Training loss and validation curves of one or more runs against tokens, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    if not png.suffix:  # what matplotlib writes for a name without one: the path printed is the file written
        png = png.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = fig.canvas.get_supported_filetypes()
    if png.suffix[1:].lower() not in kinds:
        plt.close(fig)
        raise TrainError(f"{png}: matplotlib cannot write {png.suffix!r} files (it writes {', '.join(kinds)})")
    for run in runs:
        rows = read_metrics(run)
        name = Path(run).name
        train = [r for r in rows if "loss" in r and not r.get("skipped")]
        val = [r for r in rows if r.get("event") == "val"]
        if len(runs) == 1 and train:
            ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.6, alpha=0.5,
                    label=f"{name} train")
        if val:
            ax.errorbar([r["tokens"] for r in val], [r["val_loss"] for r in val],
                        yerr=[r.get("val_stderr", 0) for r in val], marker="o", ms=3,
                        label=f"{name} val ({val[0].get('val_kind', '')})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("nats / token (MDM: ELBO bound, ARM: exact NLL)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def register(parser: argparse.ArgumentParser, name: str = "train") -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--config", default=None, help="model size (demo, tiny, 6M ... 2121M, 1.1B, or spelled out as "
      "L<layers>-H<heads>-D<width>[-F<ffn>]; default demo, or the --init-from checkpoint's)")
    a("--data", default=None, help="`smdm prepare` output or dataset dir (default: built-in corpus)")
    a("--out", default=None, help="run dir (default runs/demo-mdm or runs/demo-ar)")
    a("--objective", choices=["mdm", "ar"], default=None, help="default mdm, or the --init-from checkpoint's")
    a("--init-from", default=None, metavar="CKPT",
      help="start from this checkpoint's weights, model config, objective and tokenizer (run or step dir)")
    s = parser.add_argument_group("supervised fine-tuning (smdm.sft)")
    s.add_argument("--sft", default=None, metavar="TRAIN.jsonl",
                   help="fine-tune on (prompt, response) pairs: prompt + response + EOS, padded with EOS")
    s.add_argument("--sft-val", default=None, metavar="VAL.jsonl",
                   help="validation pairs: NLL per response token (MDM: ELBO, ARM: exact)")
    s.add_argument("--sft-format", choices=["plain", "gsm8k"], default=d.sft_format,
                   help="gsm8k: question/answer lines as `smdm eval gsm8k` prompts them (0-shot)")
    s.add_argument("--prompt-field", default=None, help="default prompt (question for --sft-format gsm8k)")
    s.add_argument("--response-field", default=None, help="default response (answer for --sft-format gsm8k)")
    s.add_argument("--p-uncond", type=float, default=d.p_uncond,
                   help="MDM: probability that a prompt is replaced by masks (CFG training; default 0)")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json for --sft without --init-from")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--flops", type=float, default=None, help="compute budget: steps = C / (6 N tokens/step)")
    g.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the data (default for --sft without a step count: {SFT_EPOCHS})")
    g.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds: a new run's steps from one timed step, re-planned from the real step times as "
                        f"it goes so it ends near the budget (default without --max-steps: {DEMO_SECONDS:g}); "
                        f"not with --resume, which keeps the run's step count")
    a("--stop-after", type=int, default=None, help="save and stop after this step")
    a("--seed", type=int, default=d.seed)
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out (error if none; "
      "one already at --max-steps / --stop-after trains nothing and says so, exit 0); it keeps the run's --lr and "
      "--warmup (another value is an error), a new --max-steps re-plans the cosine")
    a("--overwrite", action="store_true", help="start over in an --out that holds checkpoints (deletes them)")
    a("--force-resume", action="store_true", help="resume although seed / batch / world size / training data "
      "differ")
    a("--batch-size", type=int, default=d.batch_size, help="global sequences per optimizer step")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--seq-len", type=int, default=d.seq_len)
    a("--lr", type=float, default=None, help="peak learning rate (default 4e-4 for the paper's sizes, 2e-3 for "
      "tiny configs and spelled-out sizes below 5M parameters; --sft: a quarter of that)")
    a("--warmup", type=int, default=None, help="warmup steps (default max(1%% of steps, 100), at most 10%%; "
      "--sft: 3%%)")
    a("--val-every", type=int, default=None, help="steps between validations (default min(100, steps/5))")
    a("--val-samples", type=int, default=d.val_samples, help="ELBO Monte Carlo samples per sequence")
    a("--val-estimator", default=d.val_estimator, help="the MDM's validation ELBO: "
      "time (1/t weights, the paper's; default) or count (LLaDA's: about 4x less variance at the same samples on "
      "the demo)")
    a("--val-batches", type=int, default=d.val_batches)
    a("--save-every", type=int, default=d.save_every)
    a("--keep", type=int, default=d.keep)
    a("--stratified", action="store_true", help="stratified t over the global batch (default: i.i.d.)")
    a("--schedule", default=None, help="MDM noise schedule: linear (default), cosine, polynomial:P; "
      "default with --init-from or --resume: the checkpoint's")
    a("--no-doc-mask", dest="doc_mask", action="store_false", help="attend across packed documents")
    a("--compile", action="store_true", help="torch.compile each Transformer block")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block in backward (less activation memory, more compute; same results)")
    a("--attention", choices=TRAIN_ATTENTION, default=d.attention,
      help="attention implementation: auto (SDPA; a dense mask with document masking), sdpa, or flex "
           "(FlexAttention's block-sparse kernel for the document mask; CUDA only)")
    a("--precision", choices=PRECISIONS, default=d.precision,
      help="auto: bf16 autocast on CUDA, float32 elsewhere; bf16: bf16 autocast on any device (on a CPU too); fp32: "
           "none. Weights, gradients and AdamW stay float32")
    a("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun (a single process "
      "trains without it, with a note)")
    a("--plot", action="store_true", help="write OUT/loss.png (with the twin run's curve when it exists)")
    tb_help = "also write the metrics as TensorBoard events to DIR (default OUT/tensorboard; rank 0)"
    a("--tensorboard", nargs="?", const=True, default=None, metavar="DIR", help=tb_help)
    a("--samples", type=int, default=None, help="samples printed at the end (default 3 for the demo, else 0)")
    a("--vocab-size", type=int, default=None, help="check the data's vocabulary size")
    a("--verify-data", choices=VERIFY_DATA, default=d.verify_data,
      help="check every shard byte at start (full), headers and sizes only with per-batch id checks (headers), "
           "or full up to 2^30 tokens (auto)")
    a("--device", default=d.device)
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--compare", nargs="+", metavar="RUN", help="only plot the validation curves of these runs (--out PNG)")
    parser.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    if args.samples is None:
        cfg.samples = 3 if args.data is None and args.sft is None else 0
    return cfg


def train(cfg: TrainConfig) -> Trainer:
    """Run (or resume) a training run; returns the Trainer (model, step, metrics path)."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.dist.close()
    return trainer


def run(args) -> int:
    try:
        if args.compare:
            require_matplotlib("--compare")
            png = Path(args.out or "runs/compare.png")
            png.parent.mkdir(parents=True, exist_ok=True)
            print(plot_runs(args.compare, png))
            return 0
        cfg = config_from_args(args)
        trainer = train(cfg)
    except (TrainError, ckpt.CheckpointError) as e:
        print(f"smdm train: error: {e}", file=sys.stderr)
        return 2
    if trainer.dist.rank == 0:
        out = trainer.out
        if cfg.plot:
            runs = [out]
            twin = out.parent / out.name.replace("-mdm", "-ar") if "-mdm" in out.name else \
                out.parent / out.name.replace("-ar", "-mdm")
            if twin != out and (twin / "metrics.jsonl").is_file():
                runs = sorted([out, twin])
            print(f"plot: {plot_runs(runs, out / 'loss.png')}")
        if cfg.samples and not trainer.stopped and not trainer.nothing_trained:
            model, tok = ckpt.load(out, device=trainer.dist.device)
            if trainer.sft:
                print_sft_samples(model, tok, trainer.val_examples or trainer.train_examples, cfg.samples,
                                  trainer.eos_id, seed=cfg.seed)
            else:
                print_samples(model, tok, cfg.samples, trainer.kind, seed=cfg.seed)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smdm train", description=__doc__.split("\n")[0])
    register(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
