# python -m pytest tests/test_tensorboard.py -q
"""`smdm train --tensorboard`: the event files hold metrics.jsonl's numbers at its steps (read back with
TensorBoard's own readers), they reach the disk at each validation and before each checkpoint, a resume hides what
a crashed or killed run logged after its checkpoint and a fresh run hides everything older, the writer is closed
when fit raises, and without the tensorboard package the option is a clear error that touches nothing. Rank 0
alone writes: tests/test_distributed.py."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from smdm import checkpoint as ckpt
from smdm.train import TrainError, train
from test_train import CLI, cfg_for, cli_args, cli_error, make_dataset, metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

# every number of a metrics.jsonl line: an optimizer step's (train/) and a validation's (val/)
TRAIN_TAGS = {f"train/{k}" for k in ("loss", "lr", "grad_norm", "skipped", "tokens", "tokens_per_s")}
TAGS = TRAIN_TAGS | {f"val/{k}" for k in ("val_loss", "val_stderr", "val_tokens", "tokens")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} through tensorboard's event_accumulator.EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_events(logdir) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """({tag: [(step, value)]}, [(step, settings text)]) as TensorBoard shows them, purged events left out. The
    scalars through event_accumulator.EventAccumulator; everything again through the plugin accumulator that
    TensorBoard's server reads with, which must give the same scalars (and is the one that purges text events)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    scalars = read_scalars(logdir)
    served = pea.EventAccumulator(str(logdir), size_guidance={pea.TENSORS: 0})
    served.Reload()
    tensors = {
        tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in served.Tensors(tag)]
        for tag in served.Tags()["tensors"]
    }
    texts = [(step, text.decode()) for step, text in tensors.pop("run/settings/text_summary")]
    np.testing.assert_equal(tensors, scalars)  # NaN == NaN here
    return scalars, texts


def metric_series(out) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {tag: [(step, value)]}: train/<key> of the step lines, val/<key> of the val lines."""
    series = {}
    for r in metrics(out):
        if r.get("event") in (None, "val"):
            group = "val" if r.get("event") == "val" else "train"
            for key in {k.split("/")[1] for k in TAGS if k.startswith(group)}:
                series.setdefault(f"{group}/{key}", []).append((r["step"], float(r[key])))
    return series


def assert_events_are_the_metrics(scalars, out, tags=TAGS):
    """Same tags, the same steps once each, the values of metrics.jsonl rounded to float32 (NaN included)."""
    want = metric_series(out)
    assert set(scalars) == set(want) == tags
    for tag in tags:
        steps = [s for s, _ in scalars[tag]]
        assert steps == [s for s, _ in want[tag]], tag
        assert len(set(steps)) == len(steps), tag
        np.testing.assert_array_equal([v for _, v in scalars[tag]], np.float32([v for _, v in want[tag]]), err_msg=tag)


def test_events_are_the_metrics_at_their_steps(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SMDM_INJECT_NONFINITE", "2")  # step 3 is skipped: NaN loss, skipped 1
    out = tmp_path / "run"
    train(cfg_for(dataset, out, max_steps=5, val_every=2, save_every=2, tensorboard=True))
    scalars, texts = read_events(out / "tensorboard")
    assert_events_are_the_metrics(scalars, out)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars["val/val_loss"]] == [0, 2, 4, 5]
    assert [v for _, v in scalars["train/skipped"]] == [0, 0, 1, 0, 0] and math.isnan(scalars["train/loss"][2][1])
    assert scalars["val/val_stderr"][0][1] > 0
    # the run's settings, once, at the step the run started from; the option is saved with them
    assert len(texts) == 1 and texts[0][0] == 0
    assert '"max_steps": 5' in texts[0][1] and '"tensorboard": true' in texts[0][1] and '"n_layer"' in texts[0][1]
    assert ckpt.read_config(ckpt.latest(out))["train"]["tensorboard"] is True
    # a logging option, not part of the run identity: the resume writes to another directory, from its step on
    elsewhere = tmp_path / "elsewhere"
    train(cfg_for(dataset, out, max_steps=6, val_every=2, save_every=2, tensorboard=str(elsewhere), resume=True))
    more, texts = read_events(elsewhere)
    step6 = [r["loss"] for r in metrics(out) if "loss" in r and r["step"] == 6]
    assert more["train/loss"] == [(6, np.float32(step6[0]))] and [s for s, _ in texts] == [5]
    np.testing.assert_equal(read_events(out / "tensorboard")[0], scalars)  # unchanged (NaN == NaN here)


def test_resume_hides_the_events_logged_after_the_checkpoint(dataset, tmp_path):
    c = cfg_for(dataset, tmp_path / "run", max_steps=6, save_every=3, val_every=3, tensorboard=True)
    train(c)
    first, _ = read_events(Path(c.out) / "tensorboard")
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3, 4, 5, 6]
    # a crash after step 6 was logged, before its checkpoint was whole: the run resumes from step 3 (in a new
    # process, as after a crash; the bare option is OUT/tensorboard)
    shutil.rmtree(Path(c.out) / "step-6")
    proc = subprocess.run(
        CLI + cli_args(c) + ["--resume", "--tensorboard"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout
    scalars, texts = read_events(Path(c.out) / "tensorboard")
    assert_events_are_the_metrics(scalars, c.out)  # each step once, and steps 4-6 are the resumed run's
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["val/val_loss"]] == [0, 3, 6]
    assert scalars["train/tokens_per_s"][:3] == first["train/tokens_per_s"][:3]
    assert scalars["train/tokens_per_s"][3:] != first["train/tokens_per_s"][3:]
    assert [s for s, _ in texts] == [0, 3]
    # a fresh run in the same directory (--overwrite) hides every older event, as it empties metrics.jsonl
    fresh = cfg_for(dataset, c.out, max_steps=2, save_every=3, val_every=3)
    proc = subprocess.run(
        CLI + cli_args(fresh) + ["--overwrite", "--tensorboard"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    scalars, texts = read_events(Path(c.out) / "tensorboard")
    assert_events_are_the_metrics(scalars, c.out)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2] and [s for s, _ in scalars["val/val_loss"]] == [0, 2]
    assert len(texts) == 1 and '"max_steps": 2' in texts[0][1]


def run_until_then_kill(args, ready, timeout=90):
    """`smdm train ARGS` in a new process, SIGKILLed once ready() holds (or after timeout seconds)."""
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def val_steps(logdir) -> list[int]:
    return [s for s, _ in read_scalars(logdir).get("val/val_loss", [])] if logdir.is_dir() else []


def test_events_are_on_disk_while_the_run_goes_on(dataset, tmp_path):
    """What TensorBoard shows during a run: the events so far, validations included (the writer is flushed at
    each one), and they survive a SIGKILL."""
    c = cfg_for(dataset, tmp_path / "run", max_steps=100_000, val_every=2)
    logdir = Path(c.out) / "tensorboard"
    run_until_then_kill(cli_args(c) + ["--tensorboard"], lambda: 2 in val_steps(logdir))
    scalars, _ = read_events(logdir)
    assert [s for s, _ in scalars["val/val_loss"]][:2] == [0, 2]
    assert [s for s, _ in scalars["train/loss"]][:2] == [1, 2]


def test_the_writer_is_flushed_at_each_validation_and_before_each_checkpoint(dataset, tmp_path, monkeypatch):
    """What is on disk at the moment it must be, read while the writer is still open (deterministic, unlike a
    kill): right after a validation's metrics line, its events; when a checkpoint is written, every step's events
    up to it. On a local disk tensorboard's writer thread appends each event to the file at once, so this holds
    without the flush calls too (removing them is not caught here); they matter where its file system buffers
    (remote storage, flush_secs = 120 s)."""
    from smdm import train as train_mod

    out = tmp_path / "run"
    logdir = out / "tensorboard"
    on_disk = {}  # what the event files hold at each moment: {(moment, step): {tag: steps}}

    def snapshot(moment, step):
        on_disk[moment, step] = {tag: [s for s, _ in v] for tag, v in read_scalars(logdir).items()}

    real_log, real_save = train_mod.Trainer.log, train_mod.ckpt.save

    def log(self, entry):
        real_log(self, entry)
        if entry.get("event") == "val":
            snapshot("val", entry["step"])

    def save(run_dir, step, **kw):
        snapshot("save", step)
        return real_save(run_dir, step, **kw)

    monkeypatch.setattr(train_mod.Trainer, "log", log)
    monkeypatch.setattr(train_mod.ckpt, "save", save)
    train(cfg_for(dataset, out, max_steps=7, val_every=4, save_every=3, tensorboard=True))
    assert sorted(on_disk) == [("save", 3), ("save", 6), ("save", 7), ("val", 0), ("val", 4), ("val", 7)]
    assert on_disk["val", 0]["val/val_loss"] == [0]
    assert on_disk["val", 4]["val/val_loss"] == [0, 4] and on_disk["val", 4]["train/loss"] == [1, 2, 3, 4]
    assert on_disk["save", 3]["train/loss"] == [1, 2, 3]
    assert on_disk["save", 6]["train/loss"] == [1, 2, 3, 4, 5, 6]


def test_a_killed_run_resumes_without_doubling_back(dataset, tmp_path):
    """The events of every step a checkpoint holds are on disk (the writer is flushed before the checkpoint is
    written); the resume from it hides what the killed run logged after it, whatever step the kill came at."""
    c = cfg_for(dataset, tmp_path / "run", max_steps=100_000, save_every=3)  # no validation
    logdir = Path(c.out) / "tensorboard"
    run_until_then_kill(cli_args(c) + ["--tensorboard"], lambda: ckpt.latest(c.out) is not None)
    k = int(ckpt.latest(c.out).name.split("-")[1])
    killed, _ = read_events(logdir)
    assert [s for s, _ in killed["train/loss"]][:k] == list(range(1, k + 1))
    again = cli_args(cfg_for(dataset, c.out, max_steps=100_000, save_every=3))
    proc = subprocess.run(
        CLI + again + ["--resume", "--tensorboard", "--stop-after", str(k + 2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    scalars, _ = read_events(logdir)
    assert_events_are_the_metrics(scalars, c.out, tags=TRAIN_TAGS)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, k + 3))


def writer_threads() -> list[threading.Thread]:
    """The background threads of open SummaryWriters (tensorboard's event file writer; close() ends them)."""
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()]


def test_the_writer_is_closed_when_fit_raises(dataset, tmp_path, monkeypatch):
    # 20 non-finite steps in a row end the run with an exception, no validation or checkpoint having flushed
    monkeypatch.setenv("SMDM_INJECT_NONFINITE", ",".join(str(i) for i in range(20)))
    out = tmp_path / "run"
    assert not writer_threads()
    with pytest.raises(TrainError, match="the run diverged: 20 steps in a row"):
        train(cfg_for(dataset, out, max_steps=30, tensorboard=True))
    assert not writer_threads()
    scalars, _ = read_events(out / "tensorboard")
    assert scalars["train/skipped"] == [(s, 1.0) for s in range(1, 21)]


def test_without_tensorboard_the_option_is_an_error_that_touches_nothing(dataset, tmp_path, capsys, monkeypatch):
    old = tmp_path / "old"
    train(cfg_for(dataset, old, max_steps=1))
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    # `import tensorboard` fails (None in sys.modules), and torch.utils.tensorboard is imported afresh
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    new = tmp_path / "new"
    for args in (
        cli_args(cfg_for(dataset, new, max_steps=2)) + ["--tensorboard"],
        cli_args(cfg_for(dataset, old, max_steps=2)) + ["--overwrite", "--tensorboard", str(tmp_path / "tb")],
    ):
        err = cli_error(capsys, args)
        assert "--tensorboard needs the tensorboard package" in err and "pip install 'smdm[tensorboard]'" in err
    assert not new.exists() and not (tmp_path / "tb").exists()
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # checkpoint and metrics kept
