# python -m pytest tests/test_checkpoint.py -q
"""Checkpoint files (docs/CONTRACTS.md): atomic step dirs, manifest last, keep-last-N in numeric order,
corruption detection, `smdm.load`."""

from __future__ import annotations

import json

import pytest
import smdm
import torch
from smdm import checkpoint as ckpt
from smdm.model import build_model, config_by_name


def save_step(run, step, model, keep=2, **kw):
    conf = {"model": model.config.to_dict(), "objective": "ar" if model.config.causal else "mdm"}
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
             "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": 0, "batch": step}}
    return ckpt.save(run, step, model_state=model.state_dict(), config=conf, train_state=state, keep=keep,
                     **kw)


@pytest.fixture
def model():
    return build_model(config_by_name("tiny", vocab_size=50), seed=1)


def test_save_load_roundtrip(tmp_path, model):
    tok = tmp_path / "tokenizer.json"
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tok))
    d = save_step(tmp_path / "run", 7, model, tokenizer_path=tok)
    assert d.name == "step-7" and sorted(p.name for p in d.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "state.pt", "tokenizer.json"]
    assert json.loads((d / "config.json").read_text())["step"] == 7
    # the weights as readable as the files beside them (safetensors itself writes 0600)
    assert (d / "model.safetensors").stat().st_mode & 0o777 == (d / "config.json").stat().st_mode & 0o777
    m2, tokenizer = smdm.load(tmp_path / "run", device="cpu")
    assert tokenizer is not None and tokenizer.token_to_id("a") == 0
    assert not m2.training and m2.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    x = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(x), m2(x))
    state = ckpt.load_train_state(d)  # torch.load(weights_only=True)
    assert state["data"] == {"epoch": 0, "batch": 7}
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_non_finite_weights_are_refused_by_name(tmp_path, model):
    """A checkpoint whose weights hold NaN / inf (a diverged run, a bad conversion) sampled garbage in silence
    (greedy: the NaN token everywhere). smdm.load refuses it naming the tensors; check=False loads it as it is."""
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[0, 0] = float("nan")
        model.head.weight[2, 1] = float("inf")
    save_step(tmp_path / "run", 1, model)
    with pytest.raises(ckpt.CheckpointError, match=r"2 weight tensor\(s\) hold NaN or inf") as e:
        smdm.load(tmp_path / "run", device="cpu")
    assert "blocks.1.attn.proj.weight" in str(e.value) and "head.weight" in str(e.value)
    m2, _ = smdm.load(tmp_path / "run", device="cpu", check=False)
    assert torch.isnan(m2.blocks[1].attn.proj.weight[0, 0])


def test_keep_last_n_in_numeric_order(tmp_path, model):
    run = tmp_path / "run"
    for s in (9, 10, 100, 11):
        save_step(run, s, model, keep=3)
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["step-10", "step-11", "step-100"]
    assert ckpt.latest(run).name == "step-100"  # not "step-11" (string order)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        save_step(run, 200, model, keep=1)


def test_a_step_without_manifest_does_not_count(tmp_path, model):
    run = tmp_path / "run"
    save_step(run, 5, model)
    d = save_step(run, 6, model)
    (d / "manifest.json").unlink()  # as if the save had died before its last file
    assert ckpt.latest(run).name == "step-5"
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        smdm.load(tmp_path / "empty")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        smdm.load(tmp_path / "nowhere")


@pytest.mark.parametrize("manifest", [[], {"format": "smdm-checkpoint", "version": 1},
                                      {"format": "smdm-checkpoint", "version": 1, "files": {"config.json": {}}},
                                      {"format": "smdm-checkpoint", "version": 1, "files": ["config.json"]}])
def test_a_manifest_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, model, manifest):
    """It escaped as KeyError 'files' / AttributeError / KeyError 'bytes'."""
    d = save_step(tmp_path / "run", 1, model)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: "):
        smdm.load(tmp_path / "run")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_detected_and_named(tmp_path, model, damage):
    d = save_step(tmp_path / "run", 1, model)
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 1
        w.write_bytes(bytes(raw))
        msg = "sha256"
    elif damage == "truncate":
        w.write_bytes(bytes(raw[:-10]))
        msg = "truncated"
    else:
        w.unlink()
        msg = "missing"
    with pytest.raises(ckpt.CheckpointError, match=msg) as e:
        smdm.load(d)
    assert "model.safetensors" in str(e.value)


def test_resave_of_the_same_step_replaces_it(tmp_path, model):
    run = tmp_path / "run"
    save_step(run, 3, model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_step(run, 3, model)
    m2, _ = smdm.load(run)
    assert torch.equal(m2.head.weight, model.head.weight)


def test_threads_saving_one_step_at_once_leave_one_whole_checkpoint(tmp_path, model):
    """Two threads saving the same step: each writes its own temporary dir (they shared `.tmp-step-N-PID`:
    both failed with FileNotFoundError, or one published the other's half), neither's prune removes the
    other's save in progress, and the last rename wins, whole."""
    import threading

    for trial in range(5):
        run, errors = tmp_path / f"run{trial}", []

        def work(run=run, errors=errors):
            try:
                save_step(run, 5, model)
            except Exception as e:  # noqa: BLE001 (reported by the assert below)
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        ckpt.verify(run / "step-5")
        assert sorted(p.name for p in run.iterdir()) == ["step-5"]  # no temporary or trash left


def test_stale_temp_dirs_of_dead_saves_are_removed(tmp_path, model):
    """A save killed before its rename (SIGKILL, a crash) leaves a full-size `.tmp-step-N-PID`: the next save
    removes it once that PID is gone, and never touches the temp dir of a live process."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    save_step(run, 1, model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = run / f".tmp-step-2-{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = run / f".step-2.tmp-{os.getppid()}-0"  # a save in progress in another (live) process
    live.mkdir()
    ours = run / f".step-2.tmp-{os.getpid()}-7"  # an earlier save of this process that failed before its rename
    ours.mkdir()
    ours_older = run / f".tmp-step-2-{os.getpid()}"  # the same, named by smdm before 2026-11-29
    ours_older.mkdir()
    save_step(run, 3, model)
    assert not stale.exists() and not ours.exists() and not ours_older.exists()
    assert live.is_dir()
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["step-1", "step-3"]


def test_incomplete_step_dirs_outdated_by_keep_newer_steps_are_pruned(tmp_path, model):
    """A deletion cut short (rmtree removes files in directory order, the manifest possibly first) used to leave
    a `step-N` without manifest that keep-last-N never removed (it counts complete steps only). Such a dir is
    removed once `keep` newer complete steps exist (keep-last-N would remove it had it been complete); a newer
    incomplete one (possibly a copy still being written) is left alone. Deleting a step now renames it to
    `.step-N.old-PID-K` first, so a cut-short deletion leaves trash that the next prune removes."""
    import subprocess
    import sys

    run = tmp_path / "run"
    for s in (1, 2, 3):
        save_step(run, s, model, keep=10)
    (run / "step-1" / "manifest.json").unlink()  # as a deletion cut short leaves it
    newer = run / "step-9"
    newer.mkdir()
    (newer / "model.safetensors").write_bytes(b"\0" * 100)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    trash = run / f".step-0.old-{int(dead.stdout)}-0"
    trash.mkdir()
    (trash / "state.pt").write_bytes(b"\0" * 100)
    save_step(run, 3, model, keep=3)  # 3 complete steps (1 is not): nothing outdates step-1 yet
    assert (run / "step-1").is_dir()
    save_step(run, 4, model, keep=2)
    assert not (run / "step-1").exists() and not (run / "step-2").exists() and not trash.exists()
    assert newer.is_dir()
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["step-3", "step-4"]
    assert sorted(p.name for p in run.iterdir()) == ["step-3", "step-4", "step-9"]


def test_load_keeps_the_trained_schedule_for_the_samplers(tmp_path, model):
    """smdm.load sets model.train_schedule from config.json's train.schedule; smdm.generate then samples with
    it by default, as `smdm generate` does (the API used to default to linear)."""
    conf = {"model": model.config.to_dict(), "objective": "mdm", "train": {"schedule": "cosine"}}
    d = ckpt.save(tmp_path / "run", 1, model_state=model.state_dict(), config=conf, train_state={"step": 1})
    m, _ = smdm.load(d, device="cpu")
    assert m.train_schedule == "cosine"
    kw = dict(gen_length=16, steps=8, sampler="ancestral", temperature=1.0, seed=3)
    cosine = smdm.generate(m, [[1, 2]], schedule="cosine", **kw)
    assert smdm.generate(m, [[1, 2]], **kw).tokens == cosine.tokens
    linear = smdm.generate(m, [[1, 2]], schedule="linear", **kw)
    assert linear.tokens != cosine.tokens  # the two schedules reveal differently here: the default is seen
    m.train_schedule = None  # no recorded schedule: linear
    assert smdm.generate(m, [[1, 2]], **kw).tokens == linear.tokens


def test_load_on_cpu_0_and_a_bad_recorded_schedule_named(tmp_path, model):
    d = save_step(tmp_path / "run", 1, model)
    m, _ = smdm.load(d, device="cpu:0")  # safetensors itself refuses "cpu:0"
    m.train_schedule = "loglinear"  # what a hand-edited config.json could say
    with pytest.raises(ValueError, match="the checkpoint's config.json train.schedule: unknown schedule"):
        smdm.generate(m, [[1]], gen_length=4, steps=4)
    assert smdm.generate(m, [[1]], gen_length=4, steps=4, schedule="linear").tokens


@pytest.mark.parametrize("device,msg", [("mps", "smdm runs on cpu or cuda"), ("meta", "smdm runs on cpu or cuda"),
                                        ("cpu:1", "there is one CPU device"), ("gpu", "device 'gpu'")])
def test_load_names_a_device_it_cannot_use(tmp_path, model, device, msg):
    d = save_step(tmp_path / "run", 1, model)
    with pytest.raises(ValueError, match=msg):
        smdm.load(d, device=device)


def test_submodules_are_attributes_of_the_package():
    """`smdm.evaluate.score(...)` after a bare `import smdm` (the README's spelling), in a fresh interpreter,
    and `dir(smdm)` lists the API; `import smdm` alone still does not import torch."""
    import subprocess
    import sys

    code = ("import sys, smdm; assert 'torch' not in sys.modules; "
            "assert {'load', 'generate', 'infill', 'evaluate'} <= set(dir(smdm)); "
            "print(smdm.evaluate.score.__name__, smdm.diffusion.elbo_nll.__name__, smdm.data.PackedDataset.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["score", "elbo_nll", "PackedDataset"], p.stderr
