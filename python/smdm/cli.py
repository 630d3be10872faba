"""The `smdm` command line. Each subcommand lives in the module that implements it and is imported only
when used, so `smdm --help` stays fast.

    smdm prepare ...          text -> tokenizer -> shards           (smdm.data_cli)
    smdm data verify|inspect|import  check / describe / adopt shards (smdm.data_cli)
    smdm train ...            the bundled trainer (the main job)    (smdm.train)
    smdm generate|infill ...  guided generation                     (smdm.generate_cli)
    smdm eval mc|gsm8k|ppl|harness  likelihood benchmarks and lm-eval tasks, MDM vs ARM (smdm.evaluate)
    smdm lm-eval ...          lm-eval's own CLI with the model "smdm" registered (smdm.harness)
    smdm bench pack|mask|tokenize|sampler|frontier|reversal|scaling|cfg  (smdm.benchmarks.*)
    smdm kernels check        compile the CUDA sources              (smdm.kernels)
    smdm convert from-litgpt|to-litgpt|from-hf|to-hf  SMDM / TinyLlama / Hugging Face weights in and out
                                                        (smdm.convert)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# argparse types shared by the subcommands: bad values are argparse's error naming the option, when the command line
# is read (not a traceback after a run that may have taken minutes)


def json_out(value: str) -> str:
    """A `--json FILE` to write later: its directory must exist and be writable (said before the work, not
    after a benchmark's minutes), and the file must not be a directory."""
    from pathlib import Path

    parent = Path(value).parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no directory {parent}")
    if Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: the directory {parent} is not writable")
    return value


def _number(value: str, kind: type, ok, rule: str):
    """`value` as `kind` (int or float) for which `ok` holds, else argparse's error saying the `rule`."""
    try:
        x = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {value!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return x


def set_threads(n) -> None:
    """--threads N (bench, generate, infill, eval): torch's intra-op threads and the Rust core's (rayon reads
    RAYON_NUM_THREADS when its pool starts, at the first parallel call: call this before any). Without it, a
    "1 thread" run still chose its sampler's tokens on every core."""
    if not n:
        return
    import torch

    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def positive_int(value: str) -> int:
    """A count or size: an int >= 1."""
    return _number(value, int, lambda x: x >= 1, ">= 1")


def nonnegative_int(value: str) -> int:
    """A count that may be zero: an int >= 0."""
    return _number(value, int, lambda x: x >= 0, ">= 0")


def positive_float(value: str) -> float:
    """A duration or size in (0, inf)."""
    return _number(value, float, lambda x: 0 < x < float("inf"), "> 0")


def fraction(value: str) -> float:
    """A fraction in [0, 1]."""
    return _number(value, float, lambda x: 0 <= x <= 1, "a fraction in [0, 1]")


# name -> (module, help). The module defines `register(parser)` (adds its arguments / sub-subcommands and
# sets `func`) so each command's options stay next to its implementation.
COMMANDS = {
    "prepare": ("smdm.data_cli", "tokenize text into training shards"),
    "data": ("smdm.data_cli", "verify, inspect or import a shard directory"),
    "train": ("smdm.train", "train an MDM or its autoregressive twin"),
    "generate": ("smdm.generate_cli", "generate text from a checkpoint"),
    "infill": ("smdm.generate_cli", "fill the holes of a text"),
    "eval": ("smdm.evaluate", "likelihood, GSM8K and lm-eval benchmarks, MDM vs its ARM twin"),
    "lm-eval": ("smdm.harness", "lm-eval's own command line with the model \"smdm\" registered (`smdm lm-eval "
                "--model smdm --model_args ckpt=DIR --tasks T ...`)"),
    "bench": ("smdm.benchmarks", "throughput benchmarks (tables + JSON)"),
    "kernels": ("smdm.kernels", "build or compile-check the CUDA kernels"),
    "convert": ("smdm.convert", "import SMDM / lit-gpt / Hugging Face weights, or export to them"),
}
PASSTHROUGH = "lm-eval"  # hands its arguments to lm-eval's parser untouched


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smdm", description="smdm: masked diffusion language models. "
                                     "`smdm` alone runs `smdm train` (the CPU demo).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module that is used
            importlib.import_module(module).register(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the main job: `smdm` alone is `smdm train` with its defaults
        argv = ["train"]
    command = "lm-eval" if argv[0] == PASSTHROUGH else argv[0]
    try:
        if argv[0] == PASSTHROUGH:  # every argument after it is lm-eval's (its options clash with argparse here)
            from smdm.harness import lm_eval_main

            return lm_eval_main(argv[1:])
        parser = _parser(argv)
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):  # `smdm data`, `smdm bench` alone: their usage, as a usage error
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.command].print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `smdm data inspect DIR | head`: the reader left; no traceback (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT (outputs are written atomically)
        print(f"smdm {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # an output that cannot be written (a read-only place, a full disk): one line, no traceback
        what = (f"{e.filename}: {e.strerror}" if e.filename else e.strerror) if e.strerror else str(e)
        print(f"smdm {command}: error: {what}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
