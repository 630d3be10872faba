# python -m pytest -q tests/test_gpu_suite.py
"""The GPU suite's CPU dry run: `benches/gpu_suite.py --smoke` walks every section (ceilings, sampler,
attention, generation, training), each in its child process, on tiny shapes with the PyTorch references, so a
Python error in the script is caught here and not on a scarce GPU machine. Only the code paths are checked,
never the numbers. The isolation tests inject faults (--fail): a section's failure, a CUDA error that poisons
its child, a crash, a hang and the overall deadline must each cost only what they touch, and the JSON and the
table must still come out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benches" / "gpu_suite.py"


def _run(tmp_path, *args, timeout=300):
    scratch = tmp_path.parent / f"{tmp_path.name}-tmpdir"  # the suite's TMPDIR (beside --out, which it lists)
    scratch.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "TMPDIR": str(scratch)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not list(scratch.glob("smdm-gpu-suite-*"))  # the children's part files are removed at the end
    return p, json.loads((tmp_path / "gpu_suite.json").read_text())


def _check_out_dir(tmp_path):
    """What the device tool brings back: at most 8 files, plain names, no leftovers of atomic writes."""
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert not any(f.endswith(".tmp") for f in files), files
    assert all((tmp_path / f).is_file() for f in files), files


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    p, r = _run(tmp_path, "--skip-tests")
    assert r["smoke"] is True
    _check_out_dir(tmp_path)
    for section in ("env", "build", "ceilings", "sampler", "attention", "generate", "train", "sampler_compiled"):
        assert section in r and "error" not in r[section], (section, r.get(section))
        assert r["sections"][section]["status"] == "ok", (section, r["sections"][section])
    assert r["ceilings"]["copy_GBps"] > 0 and r["ceilings"]["bf16_gemm_TFLOPs"] > 0
    sampler = {k: v for k, v in r["sampler"].items() if isinstance(v, dict)}
    assert len(sampler) == 5
    for name, s in sampler.items():  # the reference against itself: identical by construction
        assert s["identical_to_reference"] is True, name
        assert s["rows"] > 0 and s["kernel"]["median_ms"] > 0 and s["speedup_vs_eager"] > 0, name
    attention = {k: v for k, v in r["attention"].items() if isinstance(v, dict)}
    assert len(attention) == 3
    for name, s in attention.items():
        assert s["max_abs_err_vs_fp32"] < 0.05 and s["finite"], name
        # the smoke run's "kernel" is the float32 reference rounded once: within the 2x rule of plain bf16
        assert s["err_ratio_vs_plain_bf16"] <= 2 and "err_ratio_vs_sdpa_math" in s, name
    gen = r["generate"]
    assert gen["arm kv-cache"]["tokens_per_s"] > 0
    assert gen["arm kv-cache"]["generated_tokens"] == gen["batch"] * gen["gen_length"]  # prompts not counted
    for label in ("mdm steps=gen/4", "mdm blocks 8 prefix-cache steps=gen/4", "mdm blocks 8 dual-cache steps=gen/4"):
        assert gen[label]["over_arm"] > 0 and gen[label]["forward_passes"] > 0, label
    train = r["train"]["steps"]
    assert train["tokens_per_s"] > 0 and train["mfu"] > 0 and train["mfu_6N"] > 0, train
    assert "6*N_non_emb*tokens" in train["flops_formula"] and train["attended_pairs_fraction"] == 1.0
    # document-masked windows: SDPA's dense mask vs FlexAttention (forward only on the CPU: no CPU backward)
    sdpa, flex = r["train"]["doc-masked sdpa"], r["train"]["doc-masked flex"]
    assert sdpa["attention"] == "sdpa" and sdpa["backward"] is True and flex["attention"] == "flex"
    assert flex["backward"] is False and "forward only" in flex["note"]
    for s in (sdpa, flex):
        assert s["tokens_per_s"] > 0 and s["documents_per_window"] == 4 and 0 < s["attended_pairs_fraction"] < 1
        assert 0 <= s["block_sparsity_percent"] < 100
    assert flex["speedup_vs_sdpa_masked"] > 0
    assert "doc-masked flex" in p.stdout
    assert r["sampler_compiled"]["gumbel T=1 bf16 rows"]["kernel"]["median_ms"] > 0
    # the table is printed last and says what it is
    assert p.stdout.rstrip().splitlines()[-2].startswith("(smoke run on CPU")
    assert (tmp_path / "bench.log").read_text().count("===== ") == 5  # one child per benchmark section


def test_gpu_suite_isolates_failures(tmp_path):
    """A CUDA error poisons its child: it is restarted and skips the item it recorded; a crash (abort) costs
    the item it hit; the GPU tests run through pytest (all skipped here) with their own log and JUnit XML."""
    p, r = _run(tmp_path, "--only", "ceilings,tests,sampler,attention", "--fail", "sampler:cuda",
                "--fail", "attention:crash:L64 D128 3 docs")
    _check_out_dir(tmp_path)
    assert {"gpu_suite.json", "suite.log", "bench.log", "pytest.log", "pytest-junit.xml"} <= {
        f.name for f in tmp_path.iterdir()}
    assert r["ceilings"]["copy_GBps"] > 0
    assert r["tests"]["returncode"] == 0 and r["tests"]["skipped"] == r["tests"]["tests"] > 0, r["tests"]
    s = r["sampler"]
    assert "illegal memory access" in s["greedy bf16"]["error"]  # the first item: where the fault was injected
    assert "restarted 1x" in s["restarts"]
    for name in ("gumbel T=1 bf16", "cfg+top-p 0.9 bf16", "top-k 50 T=0.7 entropy bf16", "gumbel T=1 fp32"):
        assert s[name]["identical_to_reference"] is True, name  # measured by the restarted child
    assert r["sections"]["sampler"] == {**r["sections"]["sampler"], "status": "partial",
                                        "failed_items": ["greedy bf16"]}
    a = r["attention"]
    assert "SIGABRT" in a["L64 D128 3 docs"]["error"] and "restarted 1x" in a["restarts"]
    assert a["L64 D64"]["kernel"]["median_ms"] > 0 and a["prefix cache q16 k80"]["kernel"]["median_ms"] > 0
    assert "generate" not in r and "train" not in r  # not selected by --only
    out = p.stdout
    assert "ERROR RuntimeError: CUDA error" in out and "ERROR child process died (killed by SIGABRT)" in out
    assert out.rstrip().splitlines()[-2].startswith("(smoke run on CPU")


def test_gpu_suite_after_a_failed_build_measures_what_it_labels(tmp_path):
    """After a failed kernel build the later children run with SMDM_KERNELS=reference. generate used to set
    "auto" again for five of its six runs (each fresh child retried the nvcc build), train compared the
    chunked head + CE with itself while labelling it smdm.linear_ce, and without the ceilings section the
    sampler divided by an assumed H100 copy rate."""
    p, r = _run(tmp_path, "--only", "build,sampler,generate,train", "--fail", "build:raise")
    assert "error" in r["build"] and r["kernels_unavailable"].startswith("later sections ran with")
    assert r["sections"]["sampler"]["status"] == "skipped"  # it needs the kernels
    gen = r["generate"]
    assert gen["kernels_forced_reference"] is True
    runs = [k for k, v in gen.items() if isinstance(v, dict) and "tokens_per_s" in v]
    assert len(runs) == 6 and all(k.endswith("SMDM_KERNELS=reference") for k in runs), runs
    assert all(gen[k]["over_arm"] > 0 for k in runs[1:])
    train = r["train"]
    assert train["steps"]["loss_head_ce"] == "plain" and "not compared" in train["chunked_ce"]
    assert train["steps"]["forward_process"].startswith("numpy reference") and "steps, plain CE" not in train
    # no measured copy rate in this run: no fraction of it
    p, r = _run(tmp_path / "s", "--only", "sampler")
    assert r["sampler"]["copy_GBps_denominator"] is None
    assert all(v["fraction_of_copy_bw"] is None for v in r["sampler"].values() if isinstance(v, dict))
    assert "no copy rate was measured in this run" in p.stdout


def test_gpu_suite_hang_and_deadline(tmp_path):
    """A hung child is killed at its time limit (what it recorded before stays), sections that no longer fit
    before --deadline are skipped, and the table is still printed. The deadline counts from the suite's start
    and must leave the child time to reach the hanging item: with 20 s, a run beside the other pytest worker's
    nvcc build once reached it with under 1 s left, recorded it as skipped, and never hung."""
    deadline = 40
    p, r = _run(tmp_path, "--only", "sampler,attention", "--fail", "sampler:hang:gumbel T=1 bf16",
                "--deadline", str(deadline), timeout=150)
    _check_out_dir(tmp_path)
    assert r["sections"]["sampler"]["status"] == "error"
    assert "killed at its time limit" in r["sampler"]["error"]
    assert r["sections"]["attention"]["status"] == "skipped" and "deadline" in r["attention"]["status"]
    assert r["seconds"] < deadline + 5  # the hung child is killed ~5 s before it; saving the rest takes a moment
    assert "skipped: deadline" in p.stdout and p.stdout.rstrip().splitlines()[-1].startswith("full results")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_suite_without_cuda_says_so():
    p = subprocess.run([sys.executable, str(SUITE), "--out", "/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--smoke" in p.stderr


def _suite_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_nvrtc_fallback_uses_the_build_switch(monkeypatch, tmp_path):
    """A failed nvcc build with CuPy importable: the build child retries through NVRTC by setting
    SMDM_KERNEL_BUILD=nvrtc (smdm's own switch, no patching of smdm internals), and the parent hands that
    variable to every later child, pytest included (no plugin, no extra import path)."""
    import types

    from smdm import kernels as K
    from smdm.kernels import _build
    from smdm.kernels._nvrtc import NvrtcModule

    gs = _suite_module()

    class RawModule:
        def __init__(self, **kw):
            pass

        def compile(self):
            pass

    find_cuda_home = _build.find_cuda_home
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    real_find_spec = gs.importlib.util.find_spec
    monkeypatch.setattr(gs.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cupy" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "device_archs", lambda: ["sm_90a"])
    monkeypatch.setattr(_build, "nvcc_version", lambda home: "13.0")
    monkeypatch.setattr(_build, "find_cuda_home", lambda: Path("/opt/fake-cuda"))
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_module_error", None)

    def nvcc_fails(src, home, verbose):
        raise K.KernelBuildError("nvcc exploded")

    monkeypatch.setattr(_build, "_build_nvcc", nvcc_fails)
    # setenv, not delenv: delenv of an unset variable records nothing, and child_build sets it in os.environ
    monkeypatch.setenv("SMDM_KERNEL_BUILD", "auto")  # = unset; restored (removed) after the test
    monkeypatch.setenv("SMDM_CACHE_DIR", str(tmp_path / "cache"))
    part = gs.Part("build", tmp_path / "build.json")
    gs.child_build(part, {})
    assert part.data["backend"] == "nvrtc" and "nvcc exploded" in part.data["nvcc_error"], part.data
    assert isinstance(_build.load(), NvrtcModule)
    assert os.environ["SMDM_KERNEL_BUILD"] == "nvrtc"
    assert _build.find_cuda_home() == Path("/opt/fake-cuda")  # smdm's discovery is left alone

    # SMDM_KERNEL_BUILD=nvcc forbids the fallback: the nvcc error stands
    monkeypatch.setenv("SMDM_KERNEL_BUILD", "nvcc")
    monkeypatch.setattr(_build, "_module", None)
    part = gs.Part("build", tmp_path / "build2.json")
    with pytest.raises(K.KernelBuildError, match="nvcc exploded"):
        gs.child_build(part, {})
    assert os.environ["SMDM_KERNEL_BUILD"] == "nvcc"
    monkeypatch.setattr(_build, "find_cuda_home", find_cuda_home)

    # the parent: the pytest child gets the variable through its environment, nothing else
    spawned = []

    def spawn(cmd, log_path, env, limit, header):
        spawned.append((cmd, env))
        log_path.write_text(f"##### {header}\n1 passed\n")
        return 0, False, 0.1

    monkeypatch.setattr(gs, "_spawn", spawn)
    monkeypatch.setattr(gs, "DEADLINE_AT", gs.time.time() + 500)
    args = types.SimpleNamespace(out=str(tmp_path / "out"), deadline=500.0, only=None, skip_tests=False,
                                 skip_model=False, fail=None)
    s = gs.Suite(args)
    try:
        s.env_extra["SMDM_KERNEL_BUILD"] = "nvrtc"
        s.tests()
    finally:  # run_suite removes it; this test drives a Suite by hand
        shutil.rmtree(s.parts, ignore_errors=True)
    (cmd, env), = spawned
    assert env["SMDM_KERNEL_BUILD"] == "nvrtc"
    assert ["-p", "gpu_suite"] not in [cmd[i:i + 2] for i in range(len(cmd))], cmd
    assert str(SUITE.parent) not in env["PYTHONPATH"].split(os.pathsep)


def test_outcome_counts_from_a_verbose_log_equal_junit(tmp_path):
    """A tests section killed before pytest writes its JUnit file still reports counts, read from the -v lines
    of its log: here they must equal the JUnit counts of a real pytest run (pass, fail, error, skip)."""
    suite = _suite_module()
    (tmp_path / "test_mix.py").write_text(
        "import pytest\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('setup')\n"
        "def test_a(): pass\ndef test_b(): pass\ndef test_c(): assert False\n"
        "def test_d(broken): pass\n@pytest.mark.skip\ndef test_e(): pass\n")
    junit = tmp_path / "j.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:randomly",
                        f"--junitxml={junit}", "-o", "addopts=", str(tmp_path / "test_mix.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    got = suite._verbose_counts(p.stdout)
    want = suite._junit_counts(junit)
    assert (got["passed"], got["failures"], got["errors"], got["skipped"]) == (2, 1, 1, 1), p.stdout
    assert (want["tests"] - want["failures"] - want["errors"] - want["skipped"], want["failures"], want["errors"],
            want["skipped"]) == (2, 1, 1, 1)
