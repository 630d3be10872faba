# python -m pytest tests/test_checkpoint.py -q
"""Checkpoints (docs/CONTRACTS.md): `OUT/step-N/` with

    model.safetensors   the weights (full, unsharded; float32 as trained)
    config.json         {"model": ModelConfig.to_dict(), "objective": "mdm"|"ar", "step": N, "train": {...}}
    tokenizer.json      copied from the data, when it had one
    state.pt            optimizer, schedule, RNG, data position (loads with torch.load(weights_only=True))
    manifest.json       written last: file names, sizes and sha256; a step dir without it does not count

A step is written into a temporary directory next to its final name, every file fsynced, then renamed (atomic
on POSIX) and the parent directory fsynced. Only the last `keep` complete steps are kept (numeric order). A step
is deleted by first renaming it to `.step-N.old-PID-K` (`discard`), so an interrupted deletion never leaves a
`step-N` without its manifest, only trash that the next prune removes.
`load(path)` -> (model, tokenizer) for inference; `smdm.load` is this function.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from smdm.errors import SmdmIOError

MANIFEST = "manifest.json"
FORMAT = "smdm-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint (the message names the path and what is wrong)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dirs(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest) in a run dir, sorted by step number (not by name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir) -> Optional[Path]:
    """The newest complete step dir of a run, or None."""
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def resolve(path) -> Path:
    """A step dir (has a manifest) or a run dir (-> its latest complete step). Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if _STEP_RE.match(path.name) and path.is_dir():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {MANIFEST}: the save was interrupted)")
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no step-N/{MANIFEST})")
    return found


def save(run_dir, step: int, *, model_state: dict, config: dict, train_state: dict,
         tokenizer_path=None, tokenizer: Optional[bytes] = None, keep: int = 2) -> Path:
    """Write OUT/step-N atomically (see the module docstring); prune to the last `keep` (>= 2) steps.

    model_state: name -> tensor (full weights); config: the config.json dict; train_state: plain containers of
    tensors / numbers / strings (what `torch.load(weights_only=True)` accepts); the step's tokenizer.json is
    copied from `tokenizer_path` (which must exist) or written from the bytes `tokenizer`."""
    from smdm.data import save_safetensors

    if keep < 2:
        raise ValueError(f"keep must be >= 2 (a crash while saving must leave a complete one), got {keep}")
    if tokenizer_path is not None and tokenizer is not None:
        raise ValueError("give tokenizer_path or tokenizer, not both")
    if tokenizer_path is not None:
        try:
            tokenizer = Path(tokenizer_path).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{tokenizer_path}: cannot read the tokenizer to save: {e.strerror or e}") from e
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step}"
    tmp = _temp_dir(run_dir, "tmp", final.name)
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_safetensors(weights, tmp / "model.safetensors", metadata={"format": FORMAT, "step": str(step)})
        (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=1, sort_keys=True))
        try:
            torch.save(train_state, tmp / "state.pt")
        except RuntimeError as e:  # torch's writer fails with RuntimeError (a full disk): an OSError naming it
            raise SmdmIOError(f"{tmp / 'state.pt'}: cannot write: {e}") from e
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_bytes(tokenizer)
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync_file(p)
            files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))  # last: marks it complete
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        for _ in range(100):  # re-saving a step (after an interrupted deletion, or by another thread): replace
            if final.exists():
                discard(final)
            try:
                os.replace(tmp, final)
                break
            except OSError as e:  # another thread's save of this step renamed into place since the check
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            raise SmdmIOError(f"{final}: could not put the new save in its place (the existing directory could not "
                              f"be removed, or other saves of this step kept taking its place)")
    except BaseException:  # a full disk, an interrupt: no half-written temporary left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _done(tmp)
    _fsync_dir(run_dir)
    prune(run_dir, keep)
    return final


# temp dirs of saves (.step-N.tmp-PID-K) and steps being deleted (.step-N.old-PID-K), named by
# `smdm.data.temp_path`: PID the writing process, K its call (two threads saving or deleting one step never share
# a name); older smdm wrote .tmp-step-N-PID and .old-step-N-PID
_TMP_RE = re.compile(r"^\.(?:step-\d+\.(?:tmp|old)-(\d+)-\d+|(?:tmp|old)-step-\d+-(\d+))$")
_IN_USE: set = set()  # this process's temp dirs still being written or deleted (prune leaves them alone)
_IN_USE_LOCK = threading.Lock()


def _temp_dir(run_dir: Path, kind: str, name: str) -> Path:
    """A new temporary path for step dir `name` in run_dir (`smdm.data.temp_path`), registered as in use until
    `_done` (tmp: created empty)."""
    from smdm.data import temp_path

    p = temp_path(run_dir / name, kind)
    with _IN_USE_LOCK:
        _IN_USE.add(p.name)
    if kind == "tmp":
        p.mkdir()
    return p


def _done(p: Path) -> None:
    with _IN_USE_LOCK:
        _IN_USE.discard(p.name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def discard(step_dir) -> None:
    """Delete a step dir: rename it to `.step-N.old-PID-K` first (atomic: it stops counting at once, whole), then
    remove that. A deletion cut short (SIGKILL, a crash, a file it cannot remove) leaves trash that `prune` removes
    once this process is gone, never a `step-N` without its manifest (rmtree removes files in directory order,
    the manifest possibly first)."""
    step_dir = Path(step_dir)
    trash = _temp_dir(step_dir.parent, "old", step_dir.name)
    try:
        try:
            os.replace(step_dir, trash)
        except FileNotFoundError:  # already gone (a concurrent prune)
            return
        except OSError:  # cannot rename (e.g. the dir is a mount point): delete in place
            trash = step_dir
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        _done(trash)


def prune(run_dir, keep: int) -> None:
    """Delete all but the last `keep` complete steps; incomplete step dirs (no manifest) that `keep` newer
    complete steps outdate; and stale temporary dirs: saves that died before their rename (a crash or SIGKILL
    mid-save leaves a full-size `.step-N.tmp-PID-K`) and deletions cut short (`.step-N.old-PID-K`), whose PID is
    gone or is ours and no thread of ours is using it (an earlier failed save or deletion in this process).

    Incomplete `step-N` dirs come from deletions cut short by versions before `discard` (or `--overwrite` runs),
    or from a copy in progress by some other tool. No smdm process ever writes into a `step-N` (saves write the
    temp dir and rename it complete), and one that keep-last-N would delete had it been complete is safe to
    delete incomplete; newer ones are left alone (a copy of a newer step may still be running)."""
    run_dir = Path(run_dir)
    dirs = step_dirs(run_dir)
    for _, p in dirs[:-keep]:
        discard(p)
    kept = [n for n, _ in dirs[-keep:]]
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and not (p / MANIFEST).is_file():
            if len(kept) >= keep and int(m.group(1)) < kept[0]:
                shutil.rmtree(p, ignore_errors=True)
            continue
        m = _TMP_RE.match(p.name)
        if m and p.is_dir():
            pid = int(m.group(1) or m.group(2))
            with _IN_USE_LOCK:
                busy = p.name in _IN_USE  # another thread of this process is writing or deleting it
            if not busy and (pid == os.getpid() or not _pid_alive(pid)):
                shutil.rmtree(p, ignore_errors=True)


def verify(step_dir) -> dict:
    """Check a step dir against its manifest (presence, size, sha256 of every file). Returns the manifest."""
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no {MANIFEST} (incomplete checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{step_dir / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{step_dir / MANIFEST}: not an {FORMAT} v{VERSION} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
            for i in files.values()):
        raise CheckpointError(f"{step_dir / MANIFEST}: field 'files' must map each file name to its bytes and "
                              f"sha256 (a damaged manifest)")
    for name, info in files.items():
        p = step_dir / name
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, the manifest says {info['bytes']} "
                                  "(truncated?)")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: sha256 does not match the manifest (corrupt file)")
    for name in ("model.safetensors", "config.json"):
        if name not in manifest["files"]:
            raise CheckpointError(f"{step_dir}: the manifest lists no {name}")
    return manifest


def model_digest(step_dir) -> str:
    """The sha256 of a step's weights and tokenizer as its manifest records them (only the manifest is read):
    what identifies the model a run used, wherever its directory lies (a copy elsewhere is the same model;
    other weights moved to the same path are not)."""
    step_dir = Path(step_dir)
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
        parts = [f"{name}:{files[name]['sha256']}" for name in ("model.safetensors", "tokenizer.json")
                 if name in files]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{step_dir / MANIFEST}: cannot read the weights' sha256: {e}") from None
    if not parts or not parts[0].startswith("model.safetensors:"):
        raise CheckpointError(f"{step_dir / MANIFEST}: lists no model.safetensors")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_config(step_dir) -> dict:
    return json.loads((Path(step_dir) / "config.json").read_text())


def load_weights(step_dir, device="cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(step_dir) / "model.safetensors"), device=str(device))


def load_train_state(step_dir) -> dict:
    p = Path(step_dir) / "state.pt"
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (a weights-only checkpoint cannot be resumed)")
    return torch.load(p, weights_only=True, map_location="cpu")


def trained_schedule(conf: dict):
    """The noise schedule a checkpoint's config.json says the MDM was trained with (`train.schedule`, as written;
    callers parse it), or None."""
    train = conf.get("train")
    return train.get("schedule") if isinstance(train, dict) else None


def check_finite(state: dict, step_dir, hint: str = "") -> None:
    """CheckpointError naming the weight tensors of `state` that hold NaN or inf (a diverged or damaged run: no
    meaningful output, and training from it skips every step)."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{step_dir}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): a diverged or damaged run" +
                              (f"; {hint}" if hint else ""))


def load(path, device=None, *, check: bool = True):
    """`smdm.load(DIR)` -> (model, tokenizer or None): a step dir or a run dir (its latest complete step), the
    model in eval mode on `device` (default: CUDA when available, else CPU), the tokenizer from tokenizer.json
    (`tokenizers.Tokenizer`) when the checkpoint has one. `check` verifies the sha256 of every file and that
    every weight is finite (a NaN / inf weight makes every sample garbage; check=False loads it to inspect)."""
    from smdm.model import ModelConfig, Transformer

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a bad --device is the user's error: a ValueError naming it, not torch's or safetensors' traceback
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {str(device)!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: smdm runs on cpu or cuda")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"device {str(device)!r}: there is one CPU device (use cpu)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available here (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    step_dir = resolve(path)
    if check:
        verify(step_dir)
    cfg = read_config(step_dir)
    try:
        config = ModelConfig(**cfg["model"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{step_dir / 'config.json'}: bad model config ({e})") from None
    with torch.device("meta"):
        model = Transformer(config)
    state = load_weights(step_dir, str(dev) if dev.type == "cuda" else "cpu")  # safetensors refuses "cpu:0"
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise CheckpointError(f"{step_dir}: weights do not match the config "
                              f"(differing keys: {sorted(missing)[:5]})")
    if check:
        check_finite(state, step_dir, "smdm.load(..., check=False) loads it anyway")
    model.load_state_dict(state, assign=True)
    model.eval()
    model.train_schedule = trained_schedule(cfg)  # the samplers' default schedule (None: linear)
    tokenizer = None
    tok = step_dir / "tokenizer.json"
    if tok.is_file():
        from smdm.data import load_tokenizer

        tokenizer = load_tokenizer(tok)  # truncation and padding off
    return model, tokenizer
