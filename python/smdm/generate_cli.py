# smdm generate --ckpt runs/demo --prompt "def main(" --gen-length 64 --steps 64 --show-steps
"""`smdm generate` and `smdm infill`: guided generation from a checkpoint (smdm.sampling).

    smdm generate --ckpt DIR --prompt TEXT [--prompt TEXT ...] [sampler options]
    smdm infill   --ckpt DIR --text "def add(a, b):<|mask:8|>return c" [sampler options]

Hole syntax of `smdm infill`: `<|mask:N|>` is a hole of N tokens, `<|mask|>` a hole of one token. The text
between holes is tokenized piece by piece (no special tokens added), so a hole always starts and ends on a
token boundary. Without a tokenizer in the checkpoint, give token ids: `--prompt-ids "1 2 3"` (generate) or
`--ids "1 2 _ _ 5"` (infill, `_` is a masked position).

`--show-steps` draws the denoising: after every step the current text with `·` for each masked position
(redrawn in place on a terminal, one line per step otherwise).

`--schedule` (linear | cosine | polynomial:P) sets how many positions each step reveals; without it the
schedule the checkpoint was trained with (`"schedule"` in the `"train"` section of its config.json), else
linear. Precedence: --schedule, then the checkpoint's train.schedule, then "linear".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from smdm.cli import json_out, positive_int, set_threads

HOLE = re.compile(r"<\|mask(?::(\d+))?\|>")
MALFORMED = re.compile(r"<\|\s*mask", re.IGNORECASE)  # what is left of a hole tag that HOLE did not match
MASK_GLYPH = "·"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")


def register(parser: argparse.ArgumentParser, name: str = "generate") -> None:
    """Add the options of `smdm generate` or `smdm infill` to `parser` and set `func`."""
    parser.description = __doc__.split("\n\n")[0] if name == "generate" else "Fill the holes of a text."
    parser.epilog = "Hole syntax: <|mask:N|> = N masked tokens, <|mask|> = one." if name == "infill" else None
    parser.add_argument("--ckpt", required=True, help="checkpoint: a step dir or a run dir (its latest step)")
    if name == "generate":
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
        src.add_argument("--prompt-ids", action="append", help="prompt token ids, e.g. '1 2 3' (repeatable)")
        src.add_argument("--input", metavar="FILE", help="JSONL of prompts (field --field; - = stdin): needs --output")
        parser.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default 128)")
        parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: gen length)")
    else:
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--text", action="append", help="text with <|mask:N|> holes (repeat for a batch)")
        src.add_argument("--ids", action="append", help="token ids with '_' for masked positions")
        src.add_argument("--input", metavar="FILE",
                         help="JSONL of texts with holes (field --field; - = stdin): needs --output")
        parser.add_argument("--steps", type=int, default=None, help="steps (default: one per hole token)")
    parser.add_argument("--sampler", default="low_confidence", help="ancestral | low_confidence | threshold")
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length")
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold tau")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised CFG weight w (0 = off)")
    parser.add_argument("--confidence", default="prob", help="prob | margin | entropy")
    parser.add_argument("--schedule", default=None,
                        help="noise schedule of the reverse steps: linear | cosine | polynomial:P "
                             "(default: the checkpoint's training schedule, else linear)")
    parser.add_argument("--cache", default=None,
                        help="none | prefix | dual (MDM, approximate: prefix keeps the K/V of the prompt and "
                             "finished blocks, dual also those after the current block; ARM: prefix = its KV "
                             "cache). Default: none for the MDM, the KV cache for the ARM")
    parser.add_argument("--cache-refresh", type=positive_int, default=None, metavar="N",
                        help="with --cache prefix|dual: rebuild the kept K/V every N forward passes in a block "
                             "(default: once per block; 1 = every pass, the uncached result)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sample j of every input uses seed + j (the noise is keyed by seed and position, so "
                             "inputs of one length given the same seed share it)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="samples per input, with seeds seed, seed + 1, ... (default 1)")
    parser.add_argument("--eos-id", type=int, default=None, help="EOS id (default: the tokenizer's EOS)")
    parser.add_argument("--no-eos", action="store_true", help="no early stop at EOS")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of torch and of the Rust sampler (default: all; on a busy machine 1 "
                             "can be much faster)")
    parser.add_argument("--show-steps", action="store_true", help="draw the denoising step by step")
    parser.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, stats)")
    batch = parser.add_argument_group("a file of inputs (--input; smdm.generate_file)")
    batch.add_argument("--output", metavar="OUT", type=json_out,
                       help="JSONL written atomically when done: one record per input and sample, input order")
    batch.add_argument("--field", default=None,
                       help="the input objects' field: text, or a list of token ids (default "
                            f"{'prompt' if name == 'generate' else 'text'})")
    batch.add_argument("--batch-size", type=positive_int, default=16,
                       help="rows per sampler call (default 16; does not change the tokens)")
    batch.add_argument("--resume", action="store_true", help="continue the unfinished run kept in OUT.part")
    batch.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(func=lambda args: main(args, name))


def check_args(args, name: str) -> None:
    """Errors that need no checkpoint (raised as ValueError with a message for the user)."""
    from smdm.sampling import CACHES, CONFIDENCES, SAMPLERS

    if args.input is None:
        given = [f"--{k.replace('_', '-')}" for k, default in BATCH_ONLY if getattr(args, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} go with --input FILE")
    else:
        if args.output is None:
            raise ValueError("--input needs --output OUT (the JSONL the records go to)")
        for flag in ("show_steps", "json"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} does not go with --input (the records go to --output)")
        args.field = args.field or ("prompt" if name == "generate" else "text")
    if name == "generate" and args.gen_length < 1:
        raise ValueError(f"--gen-length must be >= 1, got {args.gen_length}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
    if args.block_length is not None:
        if args.block_length < 1:
            raise ValueError(f"--block-length must be >= 1, got {args.block_length}")
        if name == "generate" and args.gen_length % args.block_length:
            raise ValueError(f"--block-length {args.block_length} does not divide --gen-length "
                             f"{args.gen_length}")
        steps = args.gen_length if args.steps is None and name == "generate" else args.steps
        n_blocks = args.gen_length // args.block_length if name == "generate" else None
        if n_blocks and steps is not None and args.sampler != "threshold" and steps % n_blocks:
            raise ValueError(f"--steps {steps} must be a multiple of the number of blocks ({n_blocks})")
    if (args.sampler == "threshold") != (args.threshold is not None):
        raise ValueError("--threshold is required by --sampler threshold and used by no other sampler")
    if args.steps is not None and args.sampler == "threshold":  # notes: the run goes on
        print(f"smdm {name}: note: --steps {args.steps} is unused by --sampler threshold (it commits every "
              f"position at least --threshold sure, at least one per step: its step count is adaptive)",
              file=sys.stderr)
    elif (name == "generate" and args.sampler == "low_confidence" and args.steps is not None
          and args.steps > args.gen_length):  # (ancestral: more steps refine its reveal-time grid)
        print(f"smdm generate: note: --steps {args.steps} > --gen-length {args.gen_length}: the steps past one "
              f"token each commit nothing and cost no forward pass", file=sys.stderr)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.confidence not in CONFIDENCES:
        raise ValueError(f"--confidence must be one of {', '.join(CONFIDENCES)}, got {args.confidence!r}")
    if args.cache is not None and args.cache not in CACHES:
        raise ValueError(f"--cache must be one of {', '.join(CACHES)}, got {args.cache!r}")
    if args.schedule is not None:
        from smdm.diffusion import parse_schedule

        try:
            parse_schedule(args.schedule)
        except ValueError as e:
            raise ValueError(f"--schedule: {e}") from None


def resolve_schedule(args, conf: dict) -> str:
    """The sampling schedule: --schedule, else the checkpoint config's train.schedule (the schedule the model
    was trained with), else "linear". Returns the canonical name; a bad name in the config is a ValueError
    that says where it came from."""
    from smdm.checkpoint import trained_schedule
    from smdm.diffusion import parse_schedule

    if args.schedule is not None:
        return parse_schedule(args.schedule).name
    name = trained_schedule(conf)
    if name is None:
        return "linear"
    try:
        return parse_schedule(name).name
    except ValueError as e:
        raise ValueError(f"the checkpoint's config.json train.schedule: {e} (override it with --schedule)") from None


def parse_ids(text: str, mask_id=None) -> list:
    """'1 2 _ 3' or '1,2,_,3' -> ints; '_' -> mask_id (infill only)."""
    out = []
    for tok in re.split(r"[\s,]+", text.strip()):
        if not tok:
            continue
        if tok == "_":
            if mask_id is None:
                raise ValueError("'_' (a masked position) is only allowed in `smdm infill --ids`")
            out.append(mask_id)
        elif re.fullmatch(r"\d+", tok):
            out.append(int(tok))
        else:
            raise ValueError(f"not a token id: {tok!r} (give ids separated by spaces or commas)")
    return out


def encode_with_holes(tokenizer, text: str, mask_id: int, max_len=None) -> list:
    """Tokenize `text`, turning each <|mask:N|> into N mask ids (each text piece tokenized on its own).
    A `<|mask` that is not a well-formed hole is an error (it would silently become text); with `max_len`
    (the model's context) a longer result is an error before any hole is expanded."""

    def piece(t):
        bad = MALFORMED.search(t)
        if bad:
            raise ValueError(f"malformed hole {t[bad.start():bad.start() + 16]!r}: write <|mask:N|> (N >= 1) "
                             f"or <|mask|>")
        return tokenizer.encode(t, add_special_tokens=False).ids if t else []

    ids, pos = [], 0
    for m in HOLE.finditer(text):
        ids += piece(text[pos:m.start()])
        n = int(m.group(1) or 1)
        if n < 1:
            raise ValueError(f"a hole needs at least one token: {m.group(0)!r}")
        if max_len is not None and len(ids) + n > max_len:
            raise ValueError(f"the hole {m.group(0)!r} makes the text longer than the model's context of "
                             f"{max_len} tokens")
        ids += [mask_id] * n
        pos = m.end()
    ids += piece(text[pos:])
    if mask_id not in ids:
        raise ValueError("the text has no hole: mark the positions to fill with <|mask:N|> or <|mask|>")
    return ids


def render(ids, tokenizer, mask_id) -> str:
    """Text of a partly masked sequence: runs of real tokens decoded, MASK_GLYPH for each masked position."""
    out, run = [], []
    for t in list(ids) + [None]:
        if t is not None and t != mask_id:
            run.append(int(t))
            continue
        if run:
            out.append(tokenizer.decode(run, skip_special_tokens=False) if tokenizer
                       else " ".join(map(str, run)))
            run = []
        if t is not None:
            out.append(MASK_GLYPH if tokenizer else f" {MASK_GLYPH} ")
    return "".join(out)


def _eos_id(args, tokenizer):
    if args.no_eos:
        return None
    if args.eos_id is not None:
        return args.eos_id
    if tokenizer is not None:
        for n in EOS_NAMES:
            i = tokenizer.token_to_id(n)
            if i is not None:
                return i
    return None


def main(args, name: str = "generate") -> int:
    try:
        check_args(args, name)
    except ValueError as e:
        print(f"smdm {name}: error: {e}", file=sys.stderr)
        return 2
    set_threads(args.threads)  # before any parallel Rust call starts its pool
    import smdm
    from smdm import checkpoint

    try:  # a missing or incomplete checkpoint is the user's error, not a traceback
        step_dir = checkpoint.resolve(args.ckpt)
        model, tokenizer = smdm.load(step_dir, device=args.device)
    except (ValueError, OSError) as e:
        print(f"smdm {name}: error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    mask_id = cfg.mask_id
    try:
        schedule = resolve_schedule(args, checkpoint.read_config(step_dir))
        if name == "infill" and cfg.causal:
            raise ValueError("this checkpoint is an autoregressive model: it cannot infill")
        if cfg.causal:
            note_mdm_only(args, MDM_ONLY, "smdm generate", "the checkpoint is an autoregressive model (left to "
                          "right, one token per forward pass)")
            args.cache_refresh = None  # unused by the ARM (noted above): not a setting of its runs
        elif args.cache_refresh is not None and args.cache in (None, "none"):  # the MDM's default: none
            raise ValueError("--cache-refresh needs --cache prefix or --cache dual (the MDM's block caches)")
        opts = dict(sampler=args.sampler, block_length=args.block_length, threshold=args.threshold,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    cfg_scale=args.cfg_scale, confidence=args.confidence,
                    eos_id=_eos_id(args, tokenizer), cache=args.cache, schedule=schedule,
                    cache_refresh=args.cache_refresh)
        if args.input is not None:
            from smdm import generate_file

            return generate_file.run(args, name, model, tokenizer, step_dir, schedule, opts)
        if name == "generate":
            if args.prompt is not None:
                if tokenizer is None:
                    raise ValueError(f"{args.ckpt} has no tokenizer.json: give --prompt-ids")
                rows = [tokenizer.encode(p, add_special_tokens=False).ids for p in args.prompt]
            else:
                rows = [parse_ids(p) for p in args.prompt_ids]
        elif args.text is not None:
            if tokenizer is None:
                raise ValueError(f"{args.ckpt} has no tokenizer.json: give --ids")
            rows = [encode_with_holes(tokenizer, t, mask_id, max_len=cfg.max_seq_len) for t in args.text]
        else:
            rows = [parse_ids(t, mask_id) for t in args.ids]
            if any(mask_id not in r for r in rows):
                raise ValueError("--ids has no masked position: mark the positions to fill with '_'")
        n = args.num_samples  # rows: input 0's samples, then input 1's, ...
        rows = [r for r in rows for _ in range(n)]
        opts["seed"] = [args.seed + j % n for j in range(len(rows))]
        callback = _drawer(tokenizer, mask_id if mask_id is not None else -1) if args.show_steps else None
        t0 = time.perf_counter()
        out = run_sampler(name, model, rows, args, callback=callback, **opts)
        seconds = time.perf_counter() - t0
    except ValueError as e:
        print(f"smdm {name}: error: {e}", file=sys.stderr)
        return 2
    texts = [render(t, tokenizer, mask_id) for t in out.tokens]
    if args.json:
        print(json.dumps({"tokens": out.tokens, "text": texts if tokenizer else None,
                          "forward_passes": out.forward_passes, "steps": out.steps,
                          "generated_tokens": out.generated_tokens, "schedule": schedule,
                          "seconds": round(seconds, 4)}))
    else:
        n = args.num_samples
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- {i // n}" + (f" sample {i % n} (seed {args.seed + i % n})" if n > 1 else ""))
            print(text)
        print(f"[{out.generated_tokens} tokens, {out.forward_passes} forward passes, {seconds:.2f} s]",
              file=sys.stderr)
    return 0


def run_sampler(name: str, model, rows, args, **opts):
    """smdm.generate (gen_length and steps from `args`; steps default to the generation length) or
    smdm.infill (steps from `args`, default one per hole token) on token-id rows."""
    from smdm import sampling

    if name == "generate":
        return sampling.generate(model, rows, gen_length=args.gen_length, steps=args.steps or args.gen_length, **opts)
    return sampling.infill(model, rows, steps=args.steps, **opts)


def note_mdm_only(args, defaults, command: str, what: str) -> None:
    """For an ARM checkpoint: a note on stderr naming the options of `defaults` ((name, default) pairs) that
    `args` gives other values, which apply to the MDM only (not an error: one command can run an MDM and its
    ARM twin alike). `what` says which checkpoint and why."""
    unused = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, default in defaults if getattr(args, k) != default]
    if unused:
        print(f"{command}: note: {what}: {', '.join(unused)} apply to the MDM only and are unused for it",
              file=sys.stderr)


# the options of a file of inputs (--input), with their defaults
BATCH_ONLY = (("output", None), ("field", None), ("batch_size", 16), ("resume", False), ("overwrite", False))

# the `smdm generate` options the ARM twin does not use, with their defaults
MDM_ONLY = (("steps", None), ("sampler", "low_confidence"), ("block_length", None), ("threshold", None),
            ("confidence", "prob"), ("schedule", None), ("cache_refresh", None))


def _drawer(tokenizer, mask_id):
    """The --show-steps callback: redraw in place on a terminal, else one line per step and row."""
    tty = sys.stderr.isatty()

    def draw(step, seqs):
        lines = [f"step {step}"] + [render(s.tolist(), tokenizer, mask_id) for s in seqs]
        if tty:
            sys.stderr.write("\x1b[2J\x1b[H" + "\n".join(lines) + "\n")
        else:
            sys.stderr.write(" | ".join(line.replace("\n", "\\n") for line in lines) + "\n")
        sys.stderr.flush()

    return draw
