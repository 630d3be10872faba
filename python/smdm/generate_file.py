# smdm generate --ckpt runs/demo-mdm --input prompts.jsonl --output out.jsonl   (tests: tests/test_generate_cli.py)
"""`smdm generate|infill --input FILE --output OUT`: generation for a file of prompts, resumable.

    smdm generate --ckpt DIR --input prompts.jsonl --output out.jsonl [--field prompt] [--batch-size 16]
    smdm infill   --ckpt DIR --input holes.jsonl   --output out.jsonl [--field text]
    ... interrupted (Ctrl-C, a lost machine) ...  the same command + --resume  continues where it stopped

Input: JSONL, one object per line; the field (`--field`, default `prompt` for generate, `text` for infill) is
a string (text, tokenized as `--prompt` / `--text` are: `<|mask:N|>` holes for infill) or a list of token ids
(infill: `null` marks a masked position). Blank lines are skipped; every error names the file, the line and
the field.

Output: one JSON object per (input, sample), in input order: `index` (0-based among the input's objects),
`line`, `sample`, `seed` (seed + sample, as `--num-samples` gives), `tokens` (generate: the generated ids,
cut before EOS; infill: the filled sequence), `text` (null without a tokenizer) and `input` (the input
object as read, for joining). OUT is written once, atomically, when every row is done.

Rows are batched by length (shortest first; equal lengths in input order): a batch pads its rows to its
longest, and the prefix K/V cache runs rows of one length together. A row's tokens do not depend on its
batch (the sampler's batch invariance, smdm.sampling), so neither the order nor `--batch-size` changes OUT
on the CPU (on CUDA, GEMM kernels chosen per shape can change the last bits of the logits).

Resume: finished batches are appended to `OUT.part` and fsynced; its first line records the settings
(defaults resolved), a digest of the checkpoint's weights and tokenizer (so a copy of the checkpoint elsewhere
resumes, and other weights at the same path do not) and a digest of the input, and `--resume` refuses a `.part`
written with other ones (it would mix two runs). A line cut short by a crash is dropped and its batch runs again. A file
named `OUT.part` that does not start with that header is never touched.

The input is read once (`--input -` reads standard input, and a pipe such as `--input <(...)` works; the
digest is of the bytes parsed), and an OUT or OUT.part that is the input is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smdm import checkpoint

PART_FORMAT = "smdm-generate-part-v1"


class GenerateInputError(ValueError):
    """A bad --input file, or an OUT.part that does not belong to this run (names the file and line)."""


@dataclass
class Item:
    index: int  # 0-based among the input's objects
    line: int  # 1-based line of the input file
    obj: dict  # the object as read
    ids: list  # token ids (infill: the mask id at the holes)


def read_items(path, data: bytes, field: str, name: str, tokenizer, cfg) -> list:
    """The input file's objects (`data`: its bytes, read once) as Items: `field` tokenized (string) or taken
    as ids (list), each checked against the model (ids in range, a hole and the context for infill, a token
    for the ARM; prompt + generation within the context is checked by the caller, which knows gen_length)."""
    from smdm.evaluate import jsonl_objects
    from smdm.generate_cli import encode_with_holes

    items = []
    for no, obj in jsonl_objects(path, error=GenerateInputError, data=data):
        where = f"{path}:{no}: field {field!r}"
        try:  # records are written as UTF-8: a lone surrogate ("\ud800") anywhere could not be
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenerateInputError(f"{path}:{no}: a string holds {e.object[e.start:e.end]!r}, which is not "
                                     f"Unicode text (a lone surrogate escape)") from None
        if field not in obj:
            raise GenerateInputError(f"{path}:{no}: missing field {field!r} (choose the field with --field)")
        value = obj[field]
        try:
            if isinstance(value, str):
                if tokenizer is None:
                    raise ValueError("is text but the checkpoint has no tokenizer.json: give token ids")
                if name == "infill":
                    ids = encode_with_holes(tokenizer, value, cfg.mask_id, max_len=cfg.max_seq_len)
                else:
                    ids = tokenizer.encode(value, add_special_tokens=False).ids
            elif isinstance(value, list):
                ids = _ids(value, cfg, name)
            else:
                raise ValueError(f"must be a string or a list of token ids, got {type(value).__name__}")
            if name == "infill" and len(ids) > cfg.max_seq_len:
                raise ValueError(f"has {len(ids)} tokens > the model's context of {cfg.max_seq_len}")
            if cfg.causal and not ids:
                raise ValueError("is empty: the autoregressive model needs at least one prompt token")
        except ValueError as e:
            raise GenerateInputError(f"{where} {e}") from None
        items.append(Item(len(items), no, obj, ids))
    if not items:
        raise GenerateInputError(f"{path}: no JSON objects (an empty file?)")
    return items


def _ids(value: list, cfg, name: str) -> list:
    ids = []
    for t in value:
        if t is None and name == "infill":
            ids.append(cfg.mask_id)
        elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t < cfg.vocab_size:
            ids.append(t)
        else:
            hole = "; null marks a masked position" if name == "infill" else ""
            raise ValueError(f"holds {t!r}: token ids are ints in [0, {cfg.vocab_size}){hole}")
    if name == "infill" and cfg.mask_id not in ids:
        raise ValueError("has no masked position: mark the positions to fill with null")
    return ids


def settings(args, name: str, cfg, schedule: str, eos_id, step_dir, input_digest: str) -> dict:
    """Everything that decides a row's tokens, with defaults resolved (`--steps` equal to the generation
    length is its default): a resumed run must have the same (batch size excepted)."""
    keys = ["sampler", "block_length", "threshold", "temperature", "top_k", "top_p", "cfg_scale", "confidence",
            "seed", "num_samples", "field", "cache_refresh"] + (["gen_length"] if name == "generate" else [])
    out = {k: getattr(args, k) for k in keys}
    out.update(command=name, schedule=schedule, eos_id=eos_id, model_sha256=checkpoint.model_digest(step_dir),
               input_sha256=input_digest, cache=args.cache or ("prefix" if cfg.causal else "none"),
               steps=(args.steps or args.gen_length) if name == "generate" else args.steps)
    return out


def part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def read_part(part: Path, want: dict, step_dir=None) -> dict:
    """The finished rows of `part` as {(index, sample): record}. Its header must carry the same settings
    (GenerateInputError naming the ones that differ); a last line without its newline (a crash mid-write)
    is dropped and the file cut back to the last whole line. A header of smdm before 2026-11-29 names the
    checkpoint by its path (`ckpt`) instead of its weights' digest: it matches when that path is `step_dir`."""
    raw = part.read_bytes()
    header = _part_header(raw)
    if header is None:
        raise GenerateInputError(_FOREIGN.format(part=part))
    have = dict(header.get("settings", {}))
    if "ckpt" in have and "model_sha256" not in have and step_dir is not None:
        if have.pop("ckpt") == str(Path(step_dir).resolve()):
            have["model_sha256"] = want.get("model_sha256")
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        shown = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
        raise GenerateInputError(f"{part} was written by a run with other settings ({shown}): rerun with "
                                 f"those, or delete it to start over")
    whole = raw[:raw.rfind(b"\n") + 1]  # a last line without its newline: cut short by a crash
    if len(whole) < len(raw):
        with open(part, "r+b") as f:
            f.truncate(len(whole))
    done = {}
    for no, line in enumerate(whole.split(b"\n")[1:-1], 2):
        try:
            rec = json.loads(line)
            done[(rec["index"], rec["sample"])] = rec
        except (ValueError, KeyError, TypeError):
            raise GenerateInputError(f"{part}:{no}: not a record of this run (delete the file to start "
                                     f"over)") from None
    return done


_FOREIGN = ("{part} exists and is not the part file of an `smdm generate --output` run; it was left as it is: "
            "move it away, or choose another --output")


def _part_header(raw: bytes):
    """The header of a part file's bytes, None when they do not start with one."""
    try:
        header = json.loads(raw[:raw.find(b"\n")]) if b"\n" in raw else None
    except ValueError:
        return None
    return header if isinstance(header, dict) and header.get("format") == PART_FORMAT else None


def _append(f, lines: list) -> None:
    f.write("".join(line + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def run(args, name: str, model, tokenizer, step_dir, schedule: str, opts: dict) -> int:
    """Generate for every row of args.input into args.output (module docstring). `opts` are the sampler
    options of `smdm generate` (seed excluded: it is per row here)."""
    from smdm.data import write_atomic
    from smdm.errors import SmdmIOError
    from smdm.generate_cli import render, run_sampler

    cfg = model.config
    out_path, part = Path(args.output), part_path(Path(args.output))
    stdin = args.input == "-"
    source = "<stdin>" if stdin else args.input  # how messages name the input
    for p in (out_path, part):
        if not stdin and os.path.realpath(p) == os.path.realpath(args.input):
            raise GenerateInputError(f"--output {args.output} would overwrite the input {args.input} ({p})")
    try:  # once: a pipe has no second read, and the digest must be of the bytes parsed
        if stdin:
            data = sys.stdin.buffer.read()
        else:
            with open(args.input, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise GenerateInputError(f"{args.input}: no such file") from None
    except IsADirectoryError:
        raise GenerateInputError(f"{args.input}: is a directory, not a JSONL file") from None
    items = read_items(source, data, args.field, name, tokenizer, cfg)
    if name == "generate":
        for it in items:
            if len(it.ids) + args.gen_length > cfg.max_seq_len:
                raise GenerateInputError(
                    f"{source}:{it.line}: field {args.field!r} has {len(it.ids)} tokens: with --gen-length "
                    f"{args.gen_length} that is {len(it.ids) + args.gen_length} > the model's context of "
                    f"{cfg.max_seq_len}")
    want = settings(args, name, cfg, schedule, opts["eos_id"], step_dir, hashlib.sha256(data).hexdigest())
    done = {}
    if part.exists():
        if not args.resume:
            with open(part, "rb") as f:
                ours = _part_header(f.read(1 << 16)) is not None
            raise GenerateInputError(f"{part} holds an unfinished run: add --resume to continue it, or delete "
                                     f"it to start over" if ours else _FOREIGN.format(part=part))
        done = read_part(part, want, step_dir)
    if out_path.exists() and not args.overwrite:
        raise GenerateInputError(f"{out_path} exists: add --overwrite to replace it")
    n = args.num_samples
    todo = [(it, j) for it in items for j in range(n) if (it.index, j) not in done]
    todo.sort(key=lambda r: len(r[0].ids))  # stable: equal lengths keep input order
    total = len(items) * n
    if done:
        print(f"smdm {name}: resuming: {len(done)} of {total} rows already in {part}", file=sys.stderr)
    mode = "a" if done else "w"
    t_all, gen_all, fwd_all = time.perf_counter(), 0, 0
    try:
        with open(part, mode, encoding="utf-8") as f:
            if not done:
                _append(f, [json.dumps({"format": PART_FORMAT, "settings": want})])
            for b in range(0, len(todo), args.batch_size):
                batch = todo[b:b + args.batch_size]
                rows = [it.ids for it, _ in batch]
                seeds = [args.seed + j for _, j in batch]
                t0 = time.perf_counter()
                res = run_sampler(name, model, rows, args, seed=seeds, **opts)
                dt = time.perf_counter() - t0
                gen_all, fwd_all = gen_all + res.generated_tokens, fwd_all + res.forward_passes
                recs = []
                for (it, j), toks in zip(batch, res.tokens):
                    rec = {"index": it.index, "line": it.line, "sample": j, "seed": args.seed + j, "tokens": toks,
                           "text": render(toks, tokenizer, cfg.mask_id) if tokenizer is not None else None,
                           "input": it.obj}
                    done[(it.index, j)] = rec
                    recs.append(json.dumps(rec, ensure_ascii=False))
                _append(f, recs)
                print(f"smdm {name}: {len(done)}/{total} rows, batch of {len(batch)} in {dt:.2f} s "
                      f"({res.generated_tokens / max(dt, 1e-9):.0f} generated tokens/s)", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"smdm {name}: interrupted: {len(done)} of {total} rows are in {part}; the same command with "
              f"--resume continues", file=sys.stderr)
        raise
    except OSError as e:
        raise SmdmIOError(f"{part}: cannot write: {e.strerror or e}") from e
    ordered = [done[(it.index, j)] for it in items for j in range(n)]
    write_atomic(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered).encode("utf-8"))
    part.unlink()
    seconds = time.perf_counter() - t_all
    print(f"smdm {name}: wrote {total} rows to {out_path} [{gen_all} tokens, {fwd_all} forward passes, "
          f"{seconds:.2f} s this run]", file=sys.stderr)
    return 0
