# smdm train --sft train.jsonl --sft-val val.jsonl --init-from runs/demo-mdm --out runs/sft-mdm
"""Supervised fine-tuning (DESIGN §4 "SFT"): (prompt, response) pairs from JSONL as padded token rows, their
reader, and the autoregressive twin's SFT loss. The trainer (`smdm.train`) runs the steps.

- Files: one JSON object per line with a prompt and a response string (fields `prompt` / `response`, or any
  others named), or GSM8K lines `{"question", "answer"}` (`fmt="gsm8k"`): prompt = `evaluate.gsm8k_prompt(q)`
  (the 0-shot prompt of `smdm eval gsm8k`) and response = " " + the answer without its <<...>> calculator
  notes, so the model is fine-tuned on exactly the text it is evaluated with.
- Rows: `prompt + response + [EOS]`, right-padded with EOS to the sequence length L. The prompt's ids are
  encode(prompt), the response's the rest of encode(prompt + response) (`tokenizers`, batch encode, no special
  tokens added): the tokens a sampler continuing the prompt must produce, as the pretraining data tokenized
  that text (encoded alone, a response would start with a spurious piece under a tokenizer that prepends one
  to every text, as Llama-2's adds "▁"). Where a token spans the boundary (encode(prompt + response) does not
  start with encode(prompt)), the response is encoded alone; the summary counts those examples. Special
  tokens written in the texts are text (`smdm.data.load_tokenizer(path, as_data=True)`, as `smdm prepare`
  encodes documents): a quoted `</s>` is not an EOS to learn. The padding is EOS, not a pad id: the MDM
  noises and learns it (as SMDM and LLaDA do), which is how it learns where an answer stops; the ARM learns the
  first EOS only.
- An example longer than L is dropped (never truncated: a cut answer has no EOS and teaches the model to
  stop nowhere). The count and the longest example are reported; no example fitting is an error.
- Order (as the packed reader, `smdm.data`): a Feistel permutation of the examples per (seed, epoch), each
  rank an equal contiguous share, O(1) resume from (epoch, batch). An epoch is rounded up to whole optimizer
  steps by wrapping to the start of its own order, so every example is served at least once per epoch and
  fewer than one global batch of them twice.
- Normalisation, per sequence then the mean over the batch: the MDM (`diffusion.sft_loss`) divides each row's
  sum of CE/p over masked tokens by its non-prompt tokens (answer + padding, all of which can be masked); the
  ARM (`ar_sft_loss`) divides each row's CE sum by its targets (answer + first EOS). Every sequence weighs
  the same whatever its length, so gradient accumulation and any split over ranks give the whole batch's loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from smdm.data import EpochCursor, feistel_permute
from smdm.linear_ce import cross_entropy_rows, linear_cross_entropy

FORMATS = ("plain", "gsm8k")
DEFAULT_FIELDS = {"plain": ("prompt", "response"), "gsm8k": ("question", "answer")}
ENCODE_CHUNK = 4096  # examples per batch encode (bounds the memory of the Python strings)


class SftDataError(ValueError):
    """Bad SFT data; the message names the file, the line and the field."""


def fields_for(fmt: str, prompt_field: Optional[str] = None, response_field: Optional[str] = None) -> tuple:
    """The (prompt, response) field names of a format, with the user's overrides."""
    if fmt not in FORMATS:
        raise SftDataError(f"--sft-format must be one of {FORMATS}, got {fmt!r}")
    p, r = DEFAULT_FIELDS[fmt]
    return prompt_field or p, response_field or r


def gsm8k_pair(question: str, answer: str) -> tuple[str, str]:
    """The prompt `smdm eval gsm8k` gives at 0 shots and the response it should be answered with."""
    from smdm.evaluate import gsm8k_prompt, strip_calculator

    return gsm8k_prompt(question), " " + strip_calculator(answer)


def read_pairs(path, fmt: str = "plain", prompt_field: Optional[str] = None,
               response_field: Optional[str] = None) -> Iterator[tuple[int, str, str]]:
    """(line number, prompt, response) for every non-blank line of a JSONL file (the module docstring)."""
    from smdm.evaluate import jsonl_objects

    path = Path(path)
    pf, rf = fields_for(fmt, prompt_field, response_field)
    n = 0
    for no, obj in jsonl_objects(path, SftDataError):  # each line decoded alone: errors name their very line
        text = []
        for name, role in ((pf, "prompt"), (rf, "response")):
            if name not in obj:
                raise SftDataError(f"{path}:{no}: missing field {name!r} (the {role}; fields here: "
                                   f"{', '.join(map(repr, list(obj)[:8])) or 'none'})")
            if not isinstance(obj[name], str):
                raise SftDataError(f"{path}:{no}: field {name!r} must be a string, got "
                                   f"{json.dumps(obj[name])[:60]}")
            text.append(obj[name])
        n += 1
        yield (no, *gsm8k_pair(*text)) if fmt == "gsm8k" else (no, text[0], text[1])
    if n == 0:
        raise SftDataError(f"{path}: no examples (empty file)")


def find_eos(tokenizer) -> Optional[int]:
    """The EOS id the samplers and `smdm eval` stop at (smdm.generate_cli.EOS_NAMES), or None."""
    from smdm.generate_cli import EOS_NAMES

    for name in EOS_NAMES:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    return None


@dataclass
class SftExamples:
    """Kept examples as one flat token array: example i is `tokens[offsets[i]:offsets[i + 1]]`
    = prompt + response + [EOS] (unpadded), its prompt the first `prompt_lens[i]` tokens."""

    path: Path
    seq_len: int
    eos_id: int
    tokens: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (N + 1,) int64
    prompt_lens: np.ndarray  # (N,) int64
    lines: np.ndarray  # (N,) int64: line number in the file (1-based)
    read: int  # examples in the file
    dropped: int  # examples longer than seq_len
    longest: tuple  # (tokens, line) of the longest example in the file
    split: int = 0  # kept examples whose response was encoded alone (a token spans the prompt's end)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, idx) -> dict:
        """Examples `idx` as a batch: `input_ids` (B, seq_len) int64 padded with EOS, `prompt_lens` (B,),
        `lengths` (B,) (prompt + response + the first EOS), `index` (B,) the example ids."""
        idx = np.asarray(idx, dtype=np.int64)
        x = np.full((idx.size, self.seq_len), self.eos_id, dtype=np.int64)
        for j, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            x[j, : b - a] = self.tokens[a:b]
        return {"input_ids": torch.from_numpy(x), "prompt_lens": torch.from_numpy(self.prompt_lens[idx].copy()),
                "lengths": torch.from_numpy((self.offsets[idx + 1] - self.offsets[idx]).astype(np.int64)),
                "index": torch.from_numpy(idx.copy())}

    def summary(self) -> str:
        split = (f"; {self.split} responses encoded apart from their prompts: a token spans the boundary"
                 if self.split else "")
        return (f"{self.path}: {len(self)} of {self.read} examples fit --seq-len {self.seq_len} "
                f"({self.dropped} longer dropped; the longest has {self.longest[0]} tokens, line {self.longest[1]}"
                f"{split})")


def load_examples(path, tokenizer, *, seq_len: int, eos_id: int, vocab_size: int, fmt: str = "plain",
                  prompt_field: Optional[str] = None, response_field: Optional[str] = None) -> SftExamples:
    """Read and tokenize an SFT file (module docstring). `tokenizer` is a `tokenizers.Tokenizer` (the trainer's:
    `smdm.data.load_tokenizer(path, as_data=True)`); every id must be below `vocab_size` (the model's
    vocabulary; the MDM's mask id is vocab_size)."""
    path = Path(path)
    if seq_len < 2:
        raise SftDataError(f"--seq-len must be >= 2 for SFT, got {seq_len}")
    if not 0 <= eos_id < vocab_size:
        raise SftDataError(f"EOS id {eos_id} is outside the model's vocabulary [0, {vocab_size})")
    pf, rf = fields_for(fmt, prompt_field, response_field)
    toks, offsets, plens, lines = [], [0], [], []
    read = dropped = split = 0
    longest = (0, 0)

    def flush(chunk):
        nonlocal read, dropped, split, longest
        enc_p = tokenizer.encode_batch([c[1] for c in chunk], add_special_tokens=False)
        enc_j = tokenizer.encode_batch([c[1] + c[2] for c in chunk], add_special_tokens=False)
        for (no, _, response), ep, ej in zip(chunk, enc_p, enc_j):
            p, j = ep.ids, ej.ids
            apart = j[:len(p)] != p  # a token spans the prompt's end: the response on its own
            r = tokenizer.encode(response, add_special_tokens=False).ids if apart else j[len(p):]
            for field, ids in ((pf, p), (rf, r)):
                if ids and max(ids) >= vocab_size:
                    raise SftDataError(f"{path}:{no}: field {field!r} encodes to token id {max(ids)} >= the "
                                       f"model's vocabulary size {vocab_size} (a tokenizer of another model?)")
            n = len(p) + len(r) + 1
            read += 1
            if n > longest[0]:
                longest = (n, no)
            if n > seq_len:
                dropped += 1
                continue
            split += apart
            toks.append(np.asarray(p + r + [eos_id], dtype=np.int32))
            offsets.append(offsets[-1] + n)
            plens.append(len(p))
            lines.append(no)

    chunk = []
    for item in read_pairs(path, fmt, prompt_field, response_field):
        chunk.append(item)
        if len(chunk) == ENCODE_CHUNK:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if not plens:
        raise SftDataError(f"{path}: none of its {read} examples fits --seq-len {seq_len} (prompt + response + "
                           f"EOS; the longest has {longest[0]} tokens, line {longest[1]}): raise --seq-len")
    return SftExamples(path=path, seq_len=seq_len, eos_id=eos_id, tokens=np.concatenate(toks),
                       offsets=np.asarray(offsets, dtype=np.int64), prompt_lens=np.asarray(plens, dtype=np.int64),
                       lines=np.asarray(lines, dtype=np.int64), read=read, dropped=dropped, longest=longest,
                       split=split)


class SftDataset(EpochCursor, torch.utils.data.IterableDataset):
    """Batches of examples for one rank (module docstring, "Order"). Yields `SftExamples.rows` dicts plus the
    batch's position `epoch`, `batch`. Endless unless `epochs` is given. Passes and DataLoader workers as
    `smdm.data.EpochCursor` says (each batch once over the workers).

    batch_size: rows per batch on this rank (the trainer's micro-batch); step_batches: batches per optimizer
    step (gradient accumulation), so that an epoch ends on a step boundary."""

    def __init__(self, examples: SftExamples, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, step_batches: int = 1, shuffle: bool = True, epochs: Optional[int] = None):
        if batch_size < 1 or step_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and step_batches ({step_batches}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
        self.examples = examples
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.epochs = shuffle, epochs
        n = len(examples)
        per_step = world_size * batch_size * step_batches  # examples per optimizer step (global batch)
        self.steps_per_epoch = math.ceil(n / per_step)
        self._len = self.steps_per_epoch * step_batches  # batches per epoch on this rank
        self._epoch, self._batch = 0, 0

    def example_ids(self, epoch: int, batch: int) -> np.ndarray:
        """Example ids of batch `batch` of `epoch` on this rank (int64, (B,))."""
        n = len(self.examples)
        pos = self.rank * self._len * self.batch_size + batch * self.batch_size + np.arange(self.batch_size)
        pos = pos % n  # the padded tail of an epoch wraps to the start of the same epoch's order
        if not self.shuffle:
            return pos.astype(np.int64)
        return feistel_permute(pos, n, self.seed, epoch).astype(np.int64)

    def __iter__(self) -> Iterator[dict]:
        return self._serve(self._batch_at, self.epochs)

    def _batch_at(self, epoch: int, batch: int) -> dict:
        return {**self.examples.rows(self.example_ids(epoch, batch)), "epoch": epoch, "batch": batch}


# ----------------------------------------------------------------------------------------------------
# the autoregressive twin's SFT loss


def ar_targets(tokens: torch.Tensor, prompt_lens, lengths) -> torch.Tensor:
    """(B, L-1) bool: prediction j (of token j + 1) is a target iff prompt_len <= j + 1 < length, i.e. the
    response tokens and the first EOS; the prompt and the padding after the first EOS are not."""
    B, L = tokens.shape
    pos = torch.arange(1, L, device=tokens.device)[None, :]  # (1, L-1) position of the predicted token
    pl = torch.as_tensor(prompt_lens, device=tokens.device)[:, None]
    ln = torch.as_tensor(lengths, device=tokens.device)[:, None]
    return (pos >= pl) & (pos < ln)


def ar_sft_nll(model, tokens: torch.Tensor, prompt_lens, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact -log p(response + EOS | prompt) of the ARM per sequence: (sum of CE (B,) float32, targets (B,)).
    The head runs only at target rows. With an empty prompt the first token has no prediction (no BOS)."""
    B, L = tokens.shape
    tgt = ar_targets(tokens, prompt_lens, lengths)  # (B, L-1)
    h = model.hidden(tokens[:, :-1])  # (B, L-1, d)
    ce = cross_entropy_rows(h[tgt], model.head.weight, tokens[:, 1:][tgt])  # (M,)
    row = torch.arange(B, device=tokens.device)[:, None].expand(B, L - 1)[tgt]  # (M,) the row of each target
    sums = torch.zeros(B, dtype=ce.dtype, device=ce.device).index_add(0, row, ce)  # (B,)
    return sums, tgt.sum(1)


def ar_sft_loss(model, tokens: torch.Tensor, prompt_lens, lengths) -> torch.Tensor:
    """ARM SFT loss: each sequence's CE sum over its targets divided by their number, mean over the batch
    (`ar_sft_nll`'s numbers; the head and CE chunked by `smdm.linear_ce`)."""
    B, L = tokens.shape
    tgt = ar_targets(tokens, prompt_lens, lengths)  # (B, L-1)
    h = model.hidden(tokens[:, :-1])  # (B, L-1, d)
    n = tgt.sum(1).clamp(min=1).to(torch.float64)  # (B,)
    row = torch.arange(B, device=tokens.device)[:, None].expand(B, L - 1)[tgt]  # (M,) the row of each target
    return linear_cross_entropy(h[tgt], model.head.weight, tokens[:, 1:][tgt], 1.0 / (n[row] * B))
