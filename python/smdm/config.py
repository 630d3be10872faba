# python -c "from smdm.config import TrainConfig; print(TrainConfig())"
"""Run configuration of the bundled trainer (`smdm train`); the model's config is `smdm.model.ModelConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

# The ELBO's Monte Carlo estimators (`smdm.diffusion.elbo_nll`): "time" (1/t weights, the paper's) and "count"
# (LLaDA's). Here, in a module without torch, for the command lines that offer them.
ELBO_ESTIMATORS = ("time", "count")


def check_estimator(estimator: str) -> None:
    """A ValueError unless `estimator` names one of ELBO_ESTIMATORS."""
    if estimator not in ELBO_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ELBO_ESTIMATORS}, got {estimator!r}")


@dataclass
class TrainConfig:
    config: Optional[str] = None  # model size name (smdm.model.NAMED_SIZES / TINY_SIZES); None: "demo", or
    # the --init-from checkpoint's model
    data: Optional[str] = None  # `smdm prepare` output or dataset dir; None: the built-in corpus in runs/data
    out: Optional[str] = None  # run dir; None: runs/demo-mdm or runs/demo-ar
    objective: Optional[str] = None  # "mdm" (masked diffusion) or "ar" (the autoregressive twin); None: "mdm",
    # or the --init-from checkpoint's objective
    init_from: Optional[str] = None  # checkpoint (run or step dir) whose weights, model config, objective and
    # tokenizer the run starts from (fine-tuning; not a resume: fresh optimizer, schedule and data position)
    sft: Optional[str] = None  # supervised fine-tuning on (prompt, response) pairs in this JSONL (smdm.sft)
    sft_val: Optional[str] = None  # SFT validation JSONL (MDM: ELBO, ARM: exact NLL per response token)
    sft_format: str = "plain"  # "plain": fields prompt_field / response_field; "gsm8k": question / answer as
    # `smdm eval gsm8k` prompts them at 0 shots
    prompt_field: Optional[str] = None  # None: "prompt" ("question" for the gsm8k format)
    response_field: Optional[str] = None  # None: "response" ("answer" for the gsm8k format)
    p_uncond: float = 0.0  # SFT, MDM: probability that a sample's prompt is all masks (CFG training)
    tokenizer: Optional[str] = None  # tokenizer.json for SFT without --init-from
    epochs: Optional[float] = None  # max_steps = ceil(epochs · steps per epoch) (SFT default: 3 epochs)
    max_steps: Optional[int] = None  # optimizer steps (None: from --flops, else the demo's default)
    flops: Optional[float] = None  # compute budget C: steps = C / (6 · N_nonembedding · tokens per step)
    time_budget: Optional[float] = None  # seconds: max_steps from one timed step, re-planned from the real step
    # times as the run goes (default without steps: 300);
    # a new run's length only: an error with `resume` (a resumed run keeps its max_steps)
    stop_after: Optional[int] = None  # save and stop after this step (the schedule still spans max_steps)
    seed: int = 0  # model init, data order and masks
    batch_size: int = 16  # GLOBAL sequences per optimizer step (split over ranks and accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    seq_len: int = 256  # tokens per sequence (the ARM reads seq_len + 1 and predicts seq_len)
    lr: Optional[float] = None  # peak learning rate (None: 4e-4 for the paper's sizes, 2e-3 for tiny configs;
    # SFT: a quarter of that, 1e-4 and 5e-4; --resume: the checkpoint's)
    warmup: Optional[int] = None  # linear warmup steps (None: max(1% of steps, 100), at most 10% of steps;
    # SFT: 3% of steps, at least 1; --resume: the checkpoint's)
    min_lr_ratio: float = 0.1  # the cosine ends at peak · min_lr_ratio
    weight_decay: float = 0.1  # AdamW decay of the matrices (not of norms and embeddings)
    grad_clip: float = 1.0  # max global gradient norm
    val_every: Optional[int] = None  # steps between validations (0: never; None: min(100, steps / 5))
    val_samples: int = 16  # Monte Carlo samples of the ELBO per validation sequence (MDM)
    val_estimator: str = "time"  # the validation ELBO's estimator: time | count (`diffusion.elbo_nll`)
    val_batches: int = 1  # validation batches (of the local micro-batch size) per rank
    save_every: int = 500  # steps between checkpoints (and at the end / on SIGTERM)
    keep: int = 2  # checkpoints kept (>= 2)
    doc_mask: bool = True  # attention stays inside each packed document (segment_ids)
    stratified: bool = False  # t_i = (u + i/B) mod 1 over the global batch instead of i.i.d. U(0, 1)
    schedule: Optional[str] = None  # MDM noise schedule: "linear" (the paper's), "cosine", "polynomial:P"
    # (DESIGN §4); None: the --resume / --init-from checkpoint's, else linear. Saved in config.json "train", where
    # `smdm generate` reads it as its default.
    compile: bool = False  # torch.compile each Transformer block
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward
    attention: str = "auto"  # model.attention: "auto" | "sdpa" | "flex" (FlexAttention for the document mask;
    # CUDA only); a run option like activation_checkpointing (not part of the run identity)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 elsewhere; "bf16": bf16 autocast on any
    # device (CPUs too: the GPU's mixed-precision path, runnable and tested on a CPU); "fp32": no autocast.
    # Weights, gradients and the optimizer stay float32. A run option (not part of the run identity)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    resume: bool = False  # continue from the latest checkpoint in `out` (error if there is none)
    overwrite: bool = False  # start fresh in an `out` that holds checkpoints (they are deleted)
    force_resume: bool = False  # resume although the run identity (seed, batch split, world size, seq_len,
    # schedule, stratified, doc_mask, the training data's identity) differs
    plot: bool = False  # write OUT/loss.png (matplotlib)
    tensorboard: Union[bool, str] = False  # TensorBoard event files from rank 0 (torch.utils.tensorboard):
    # True: OUT/tensorboard, a str: that directory; a logging option (not part of the run identity)
    samples: int = 0  # samples printed at the end (the demo prints 3)
    vocab_size: Optional[int] = None  # optional check against the data's vocabulary
    verify_data: str = "auto"  # "full": CRC + every token id of every shard at start; "headers": headers and
    # sizes only (each batch's ids are still checked); "auto": full up to 2^30 tokens, else headers

    def to_dict(self) -> dict:
        return asdict(self)
