# python3 benches/gpu_suite.py --out $OUT [--deadline 500]     (one H100/H200: ~8 min estimated, never run yet)
# python3 benches/gpu_suite.py --smoke --out /tmp/s   (CPU: every section on tiny shapes with the PyTorch
#                                                      references; checks the script, not the GPU)
"""smdm GPU suite: builds the kernels, runs `pytest -m gpu`, measures the physical ceilings (copy bandwidth,
bf16 GEMM), then benchmarks with CUDA events (warm-up, medians, fresh random inputs per repetition):

  sampler           fused unmask_step kernel vs the eager PyTorch reference: bytes of logits read per second
                    as a fraction of the measured copy bandwidth (target >= 0.7), speed-up (target >= 5x)
  attention         the flash kernel vs SDPA's flash and cuDNN backends, bf16, TFLOP/s = 4 B H Lq Lk D / t
                    (dense, bidirectional: no causal halving; targets >= 1.0x flash, >= 0.9x cuDNN at L >= 1k);
                    plus document-masked (vs SDPA efficient + boolean mask) and prefix-cache shapes
  generate          1028M MDM samplers vs its ARM twin with the static KV cache: generated tokens/s (prompt
                    tokens not counted), wall clock with synchronize over whole generate() calls
  train             steps of the 1028M MDM objective (bf16 autocast, fp32 master weights, fused AdamW):
                    tokens/s and MFU against the card's dense bf16 peak (formula in the JSON); then the same
                    steps on document-masked windows (4 documents each): SDPA's dense mask vs FlexAttention
  sampler_compiled  the token-choice half of the sampler vs the torch.compile'd reference (last: the compile
                    takes a minute and matters least)

Robustness (one shot on a lent GPU): every section but `env` and `ceilings` (plain PyTorch) runs in its own
child process with a time limit, so a CUDA error (which poisons a process's context), a crash or a hung kernel
costs that section only; a child whose context died is restarted and skips the items it already recorded.
`--deadline` seconds (default 500) bounds the whole run: sections that no longer fit are skipped, a child still
running at the deadline is killed, and the table is still printed. After every section (children: after every
item) the results are written atomically to $OUT/gpu_suite.json, so a run killed from outside keeps what it
measured. Logs: $OUT/suite.log (this process), build.log, pytest.log + pytest-junit.xml, bench.log (the
benchmark children); 6 files in all (the device tool brings back at most 8).

--smoke runs the same sections (child processes included) on the CPU with tiny shapes, the references in place
of the kernels and wall clocks in place of CUDA events, so a Python error in this script is caught by the CPU
test suite (tests/test_gpu_suite.py) instead of costing a scarce GPU run. Its numbers mean nothing.
--fail SECTION:MODE[:ITEM] (tests of this script) injects a fault: raise | cuda (a simulated CUDA error that
poisons the child) | crash (abort) | hang.
"""

from __future__ import annotations

import time

T_START = time.time()  # the deadline counts from here (before the torch import)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _setup_paths() -> list[str]:
    """python/ (smdm itself, with the prebuilt Rust extension python/smdm/_core.abi3.so) goes first; .gpu_pkgs/
    (`pip install --target .gpu_pkgs pytest pytest-timeout` on the CPU machine, for a GPU machine without a
    package index) only when pytest is not importable otherwise: its pytest/pluggy/packaging must not shadow
    the machine's own (whose pytest plugins, e.g. pytest-benchmark, are built for that pytest)."""
    paths = [str(ROOT / "python")]
    if paths[0] not in sys.path:
        sys.path.insert(0, paths[0])
    gp = ROOT / ".gpu_pkgs"
    if gp.is_dir():
        if str(gp) in sys.path or importlib.util.find_spec("pytest") is None:
            if str(gp) not in sys.path:
                sys.path.append(str(gp))
            paths.append(str(gp))
    return paths


EXTRA_PATHS = _setup_paths()

import torch  # noqa: E402

SMOKE = False  # --smoke: CPU, tiny shapes, references (set once by main)
DEV = "cuda"
KERNEL = "cuda"  # the `backend=` of the kernels under test ("reference" in smoke mode)
DEADLINE_AT = T_START + 500.0  # epoch seconds; main() sets it (children get it from the parent)
FAULTS: dict = {}  # section -> (mode, item or None), from --fail / $SMDM_SUITE_FAIL
LOG_NAMES = {"suite": "suite.log", "build": "build.log", "tests": "pytest.log", "bench": "bench.log"}
MAX_LOG_BYTES = 15 << 20  # the device tool brings back files of at most 16 MiB

# Per-section plan: estimated seconds on one H100 (16 cores), the child's hard time limit, the least time
# left at which it is still started, and the time it leaves for the sections after it. Reasoning in
# benches/results/README.md.
PLAN = {
    #                   estimate  cap  min_start  reserve
    "build": (60, 300, 20, 0),
    "tests": (140, 260, 45, 120),
    "sampler": (35, 120, 30, 90),
    "attention": (35, 120, 30, 60),
    "generate": (60, 150, 45, 40),
    "train": (80, 105, 30, 0),
    "sampler_compiled": (80, 200, 60, 0),
}
ORDER = ["build", "tests", "sampler", "attention", "generate", "train", "sampler_compiled"]
NEEDS_KERNELS = ("tests", "sampler", "attention", "sampler_compiled")


def forced_reference() -> bool:
    """SMDM_KERNELS=reference, which the parent sets for every child after a failed kernel build: generate runs
    the references, smdm.linear_ce its plain form, the forward process its numpy definition."""
    return os.environ.get("SMDM_KERNELS", "").strip().lower() == "reference"


def pick(gpu, smoke):
    """A size for the GPU run, or the tiny one of the CPU smoke run."""
    return smoke if SMOKE else gpu


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def left() -> float:
    return DEADLINE_AT - time.time()


def elapsed() -> float:
    return time.time() - T_START


_SUITE_LOG: Path | None = None


def log(msg: str) -> None:
    line = f"[{elapsed():6.1f}s] {msg}"
    print(line, flush=True)
    if _SUITE_LOG is not None:
        with open(_SUITE_LOG, "a") as f:
            f.write(line + "\n")


def sig3(x: float) -> float:
    """Three significant figures: a CPU smoke run's MFU (~1e-4) must not round to zero."""
    return float(f"{x:.3g}")


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


HOST_SLACK_CYCLES = 2_000_000  # ~1 ms of GPU clock: a spin queued before each timed call (see cuda_time)


def cuda_time(fn, setup=None, reps: int = 10, warmup: int = 3) -> dict:
    """Median / min milliseconds of fn(*setup()) with CUDA events (wall clock in smoke mode); `setup()`
    (untimed, synchronized before the start event) draws fresh inputs each repetition.

    After the synchronize the GPU would be idle, so the start event would fire at once and the host's work
    before the first kernel (Python checks, op dispatch, allocations, attribute calls: tens of microseconds)
    would count as GPU time, a large share of a sub-millisecond kernel. A ~1 ms spin kernel queued first keeps
    the GPU busy while the host enqueues; the events then time the GPU work alone. `host_ms` is the host's
    enqueue time per call (median), reported beside it."""
    if SMOKE:
        reps, warmup = min(reps, 2), min(warmup, 1)
    for _ in range(warmup):
        args = setup() if setup else ()
        fn(*args)
    sync()
    times, host = [], []
    for _ in range(reps):
        args = setup() if setup else ()
        sync()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(HOST_SLACK_CYCLES)
            a.record()
            t = time.perf_counter()
            fn(*args)
            host.append((time.perf_counter() - t) * 1e3)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t) * 1e3)
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps, "warmup": warmup,
           "times_ms": [round(x, 4) for x in times]}
    if host:
        out["host_ms"] = round(statistics.median(host), 4)  # ~1 ms or more: the spin no longer hid it
    return out


def _cuda_fatal(e: BaseException) -> bool:
    """Errors after which the process's CUDA context is unusable (sticky): the child restarts."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    s = f"{type(e).__name__}: {e}"
    return any(k in s for k in ("CUDA error", "CUDA_ERROR", "AcceleratorError", "illegal memory access",
                                "illegal instruction", "unspecified launch failure", "misaligned address"))


# ------------------------------------------------------------------------------------------------------------
# child side: one section per process, results saved after every item
# ------------------------------------------------------------------------------------------------------------
class CudaPoisoned(Exception):
    pass


class Part:
    """A child's section results, rewritten atomically after every item. A restarted child (after a CUDA
    error) loads them and skips the items already recorded."""

    def __init__(self, section: str, path: Path):
        self.section, self.path = section, path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        self._first_item: str | None = None

    def save(self) -> None:
        write_json(self.path, self.data)

    def fault(self, point: str) -> None:
        mode, item = FAULTS.get(self.section, (None, None))
        # default point: the section's first item (the build, which has none: its start)
        target = item or ("start" if self.section == "build" else self._first_item)
        if mode is None or point != target:
            return
        print(f"gpu_suite: injecting fault {mode!r} at {self.section}/{point}", flush=True)
        if mode == "raise":
            raise RuntimeError(f"forced failure (--fail {self.section}:raise)")
        if mode == "cuda":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by --fail)")
        if mode == "crash":
            sys.stdout.flush()
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no torch-sized core file in the working directory
            os.abort()
        if mode == "hang":
            time.sleep(10**6)

    def item(self, name: str, fn, *a, min_left: float = 5.0, **kw):
        """Run fn(*a, **kw) as item `name` unless it is recorded already; an exception is recorded as the
        item's error (a CUDA error also stops this child: its context is gone)."""
        if self._first_item is None:
            self._first_item = name
        if name in self.data:
            return self.data[name]
        if left() < (1 if SMOKE else min_left):
            self.data[name] = f"skipped: deadline ({left():.0f} s left)"
            self.save()
            return self.data[name]
        self.data["_running"] = name
        self.save()
        t = time.perf_counter()
        fatal = None
        try:
            self.fault(name)
            r = fn(*a, **kw)
            sync()  # an asynchronous kernel error belongs to this item, not the next
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-3000:]}
            print(f"{self.section}/{name} failed:\n{traceback.format_exc()}", flush=True)
            if _cuda_fatal(e):
                fatal = e
        if isinstance(r, dict):
            r.setdefault("item_seconds", round(time.perf_counter() - t, 2))
        self.data[name] = r
        self.data.pop("_running", None)
        self.save()
        if fatal is not None:
            raise CudaPoisoned(str(fatal)) from fatal
        empty_cache()
        return r


def child_main(args) -> None:
    """Run one section in this process; exit 0 (done), 1 (section error), 3 (CUDA context poisoned)."""
    part = Part(args.child, Path(args.part))
    ctx = json.loads(args.ctx or "{}")
    print(f"===== {args.child} (pid {os.getpid()}, {left():.0f} s to its deadline; times below count from "
          "this process's start) =====", flush=True)
    rc = 0
    try:
        part.fault("start")
        SECTIONS[args.child](part, ctx)
    except CudaPoisoned:
        rc = 3
    except Exception as e:
        part.data["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
        part.data["traceback"] = traceback.format_exc()[-4000:]
        print(traceback.format_exc(), flush=True)
        rc = 3 if _cuda_fatal(e) else 1
    part.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # no interpreter teardown: after a CUDA error it can hang in the driver


# ------------------------------------------------------------------------------------------------------------
def section_env() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "argv": sys.argv[1:], "extra_sys_path": EXTRA_PATHS}
    try:
        import smdm

        info["smdm"] = str(Path(smdm.__file__).parent)
    except Exception as e:
        info["smdm"] = f"import failed: {e}"
    try:
        from smdm import _core  # noqa: F401

        info["rust_core"] = "ok"
    except Exception as e:  # training falls back to the numpy forward process
        info["rust_core"] = f"unavailable: {type(e).__name__}: {e}"
    for mod in ("pytest", "pytest_timeout", "pytest_benchmark", "cupy", "triton"):
        spec = importlib.util.find_spec(mod)
        info[mod] = spec.origin if spec else None
    # what the nvcc/pybind11 build and Triton (inductor, compiled FlexAttention) need: without them those
    # fail with messages far from the cause
    import sysconfig

    py_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    info["python_h"] = str(py_h) if py_h.is_file() else f"missing ({py_h})"
    for cc in ("gcc", "g++"):
        try:
            v = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=15).stdout
            info[cc] = v.splitlines()[0] if v else "no output"
        except Exception as e:
            info[cc] = f"unavailable: {type(e).__name__}"
    if DEV != "cuda":
        info["gpu"] = "none (CPU smoke run: numbers are meaningless)"
        return info
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), peak_bf16_dense_TFLOPs=nominal_peak(p.name))
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def nominal_peak(name: str) -> float | None:
    """Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the card, from its name."""
    n = name.upper()
    if "H100" in n or "H200" in n or "H800" in n or "GH200" in n:
        return 756.0 if "PCIE" in n else 835.0 if "NVL" in n else 989.0
    if "A100" in n or "A800" in n:
        return 312.0
    if "L40S" in n:
        return 362.0
    return None


def section_ceilings() -> dict:
    """Device-to-device copy (bytes read + written) and a bf16 GEMM, both on random data."""
    n = pick(1 << 28, 1 << 20)  # 1 GiB of float32
    src = torch.empty(n, device=DEV).uniform_()
    dst = torch.empty_like(src)
    r = cuda_time(dst.copy_, lambda: (src,), reps=20, warmup=3)
    copy_gbs = 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9
    src = dst = None  # free the 2 GiB before the GEMM
    m = pick(8192, 256)
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    g = cuda_time(lambda: a @ b, reps=20, warmup=3)
    tflops = 2 * m**3 / (g["median_ms"] * 1e-3) / 1e12
    a = b = None
    empty_cache()
    return {"copy_GBps": round(copy_gbs, 1) if copy_gbs > 10 else sig3(copy_gbs),
            "bf16_gemm_TFLOPs": round(tflops, 1) if tflops > 10 else sig3(tflops), "gemm_n": m, "copy_bytes": 2 * n * 4,
            "copy": r, "gemm": g}


# ------------------------------------------------------------------------------------------------------------
def child_build(part: Part, ctx: dict) -> None:
    if SMOKE:  # no CUDA here; the CPU suite compile-checks the sources (`smdm kernels check`) instead
        part.data["status"] = "skipped: smoke run (no CUDA)"
        return
    from smdm.kernels import _build as B

    mode = B.build_mode()  # SMDM_KERNEL_BUILD (auto | nvcc | nvrtc); the parent sets nvrtc after a fallback
    home = B.find_cuda_home()
    part.data.update(cuda_home=str(home), nvcc=B.nvcc_version(home) if home else None, archs=B.device_archs(),
                     max_jobs=os.environ.get("MAX_JOBS"), cache=str(B.cache_root()), build_mode=mode)
    part.save()
    t = time.perf_counter()
    if home is not None and mode != "nvrtc":
        try:
            mod = B.load(verbose=True)
            part.data.update(backend="nvcc", seconds=round(time.perf_counter() - t, 1),
                             module=getattr(mod, "__file__", type(mod).__name__))
            return
        except B.KernelBuildError as e:
            print(f"nvcc build failed:\n{e}", flush=True)
            part.data.update(nvcc_error=str(e)[-6000:], nvcc_seconds=round(time.perf_counter() - t, 1))
            part.save()
            if mode == "nvcc" or importlib.util.find_spec("cupy") is None:  # nvcc demanded, or no CuPy
                raise
            print("retrying through NVRTC (CuPy): SMDM_KERNEL_BUILD=nvrtc", flush=True)
            os.environ["SMDM_KERNEL_BUILD"] = "nvrtc"  # a failed build is final per mode: this one retries
            t = time.perf_counter()
    mod = B.load(verbose=True)  # NVRTC here (no toolkit, SMDM_KERNEL_BUILD=nvrtc, or the fallback); nvcc mode raises
    part.data.update(backend="nvrtc", seconds=round(time.perf_counter() - t, 1), module=type(mod).__name__)


# ------------------------------------------------------------------------------------------------------------
SAMPLER_CONFIGS = [
    # name, B, L, candidate fraction, dtype, cfg, T, top_k, top_p, confidence
    ("greedy bf16", 32, 256, 1.0, torch.bfloat16, 0.0, 0.0, 0, 1.0, "prob"),
    ("gumbel T=1 bf16", 32, 256, 1.0, torch.bfloat16, 0.0, 1.0, 0, 1.0, "prob"),
    ("cfg+top-p 0.9 bf16", 16, 256, 1.0, torch.bfloat16, 1.0, 1.0, 0, 0.9, "margin"),
    ("top-k 50 T=0.7 entropy bf16", 16, 256, 0.5, torch.bfloat16, 0.0, 0.7, 50, 1.0, "neg_entropy"),
    ("gumbel T=1 fp32", 16, 256, 1.0, torch.float32, 0.0, 1.0, 0, 1.0, "prob"),
]


def child_sampler(part: Part, ctx: dict) -> None:
    copy_gbs = ctx.get("copy_GBps")  # measured by `ceilings` in this run, else None: no fraction is reported
    part.data["copy_GBps_denominator"] = copy_gbs
    V = pick(32000, 1000)
    for name, B, L, *cfg in SAMPLER_CONFIGS:
        B, L = pick((B, L), (2, 16))
        part.item(name, _bench_sampler, B, L, *cfg, V=V, copy_gbs=copy_gbs, min_left=15)
        r = part.data.get(name)
        if isinstance(r, dict) and "kernel_GBps" in r:
            log(f"sampler {name}: {r['kernel_GBps']} GB/s, x{r.get('speedup_vs_eager')} vs eager, "
                f"identical {r.get('identical_to_reference')}")


def _sampler_inputs(B, L, V, dtype, cfg, frac):
    def rnd():
        return (torch.randn(B, L, V, device=DEV) * 3).to(dtype)

    logits = rnd()
    unc = rnd() if cfg else None
    cand = torch.rand(B, L, device=DEV) < frac
    cand[:, 0] = True  # at least one candidate per row
    return logits, unc, cand


def _bench_sampler(B, L, frac, dtype, cfg, T, top_k, top_p, conf, *, V, copy_gbs) -> dict:
    from smdm import kernels as K
    from smdm.kernels import _reference as R

    logits, unc, cand = _sampler_inputs(B, L, V, dtype, cfg, frac)
    seeds = torch.randint(0, 2**62, (B,), device=DEV)
    n = torch.full((B,), 8, device=DEV)
    kw = dict(uncond_logits=unc, cfg_scale=cfg, temperature=T, top_k=top_k, top_p=top_p, confidence=conf,
              n_commit=n)

    def setup():  # fresh random logits in place (no allocation) and random token ids, each repetition
        logits.normal_(0.0, 3.0)
        return logits, torch.randint(0, V, (B, L), device=DEV)

    rows = int(cand.sum())
    nbytes = rows * V * logits.element_size() * (2 if cfg else 1)  # logits read at the candidate rows
    res = {"B": B, "L": L, "V": V, "dtype": str(dtype), "rows": rows, "bytes": nbytes}
    kern = cuda_time(lambda x, t: K.unmask_step(x, t, cand, seeds, 1, backend=KERNEL, **kw), setup, reps=20)
    res["kernel"] = kern
    res["kernel_GBps"] = round(nbytes / (kern["median_ms"] * 1e-3) / 1e9, 1 if not SMOKE else 4)
    res["fraction_of_copy_bw"] = (round(nbytes / (kern["median_ms"] * 1e-3) / 1e9 / copy_gbs, 3) if copy_gbs
                                  else None)  # no copy rate measured in this run (ceilings not run or failed)
    x, t1 = setup()
    t2 = t1.clone()
    a = K.unmask_step(x, t1, cand, seeds, 1, backend=KERNEL, **kw)
    try:
        ref = R.unmask_step_reference(x, t2, cand, seeds, 1, **kw)
        res["identical_to_reference"] = bool(all(torch.equal(p, q) for p, q in zip(a, ref)) and torch.equal(t1, t2))
        if not res["identical_to_reference"]:
            res["differing"] = {nm: int((p != q).sum()) for nm, p, q in zip(("pred", "conf", "committed"), a, ref)}
            res["differing"]["tokens"] = int((t1 != t2).sum())
        del ref
        empty_cache()
        eager = cuda_time(lambda x, t: R.unmask_step_reference(x, t, cand, seeds, 1, **kw), setup, reps=3,
                          warmup=1)
        res["eager"] = eager
        res["speedup_vs_eager"] = sig3(eager["median_ms"] / kern["median_ms"])
    except Exception as e:  # the kernel's timing above stays recorded
        if _cuda_fatal(e):
            raise
        res["eager"] = f"error: {type(e).__name__}: {e}"[:300]
    return res


def child_sampler_compiled(part: Part, ctx: dict) -> None:
    part.item("gumbel T=1 bf16 rows", _bench_compiled, min_left=45)


def _bench_compiled() -> dict:
    """The row part (token choice + confidence, what the kernel's one pass over the logits does) of the
    'gumbel T=1 bf16' config: the kernel vs torch.compile(choose_tokens_reference), same rows."""
    from smdm import kernels as K
    from smdm.kernels import _reference as R

    _, B, L, _, dtype, _, T, top_k, top_p, conf = SAMPLER_CONFIGS[1]
    B, L = pick((B, L), (2, 16))
    V = pick(32000, 1000)
    rows = torch.empty(B * L, V, device=DEV, dtype=dtype)
    rows.copy_(torch.randn(B * L, V, device=DEV) * 3)
    pos = torch.arange(B * L, device=DEV) % L
    sd = torch.arange(B * L, device=DEV) // L
    ck = dict(seeds=sd, positions=pos, step=1, temperature=T, top_k=top_k, top_p=top_p, confidence=conf)

    def setup():
        rows.normal_(0.0, 3.0)
        return (rows,)

    res = {"rows": B * L, "V": V, "bytes": rows.numel() * rows.element_size()}
    kres = cuda_time(lambda r: K.choose_tokens(r, backend=KERNEL, **ck), setup, reps=20)
    res["kernel"] = kres
    res["kernel_GBps"] = round(res["bytes"] / (kres["median_ms"] * 1e-3) / 1e9, 1)
    if SMOKE:  # compiling needs a C++ toolchain and a minute: the GPU run only
        res["compiled_reference"] = "skipped: smoke run"
        return res
    comp = torch.compile(R.choose_tokens_reference, dynamic=False)
    t = time.perf_counter()
    comp(rows, **ck)
    sync()
    res["compile_seconds"] = round(time.perf_counter() - t, 1)
    cres = cuda_time(lambda r: comp(r, **ck), setup, reps=10)
    res["compiled_reference"] = cres
    res["speedup_vs_compiled"] = round(cres["median_ms"] / kres["median_ms"], 2)
    tk, ck_ = K.choose_tokens(rows, backend=KERNEL, **ck)
    tc, cc_ = comp(rows, **ck)
    res["compiled_token_agreement"] = round(float((tk == tc).float().mean()), 6)
    log(f"sampler rows vs compiled: x{res['speedup_vs_compiled']} (compile {res['compile_seconds']} s)")
    return res


# ------------------------------------------------------------------------------------------------------------
ATTN_SHAPES = [
    # name, B, H, Lq, Lk, D, documents
    ("L1024 D128", 8, 16, 1024, 1024, 128, 0),
    ("L2048 D128", 4, 16, 2048, 2048, 128, 0),
    ("L4096 D128", 2, 16, 4096, 4096, 128, 0),
    ("L2048 D64", 4, 32, 2048, 2048, 64, 0),
    ("L2048 D128 1.1B (14 heads)", 4, 14, 2048, 2048, 128, 0),
    ("L2048 D128 8 docs", 4, 16, 2048, 2048, 128, 8),
    ("prefix cache q256 k2048", 8, 16, 256, 2048, 128, 0),
    ("ragged L1000 D128", 4, 16, 1000, 1000, 128, 0),
]
ATTN_SMOKE = [("L64 D64", 1, 2, 64, 64, 64, 0), ("L64 D128 3 docs", 1, 2, 64, 64, 128, 3),
              ("prefix cache q16 k80", 2, 2, 16, 80, 64, 0)]


def child_attention(part: Part, ctx: dict) -> None:
    for name, *shape in pick(ATTN_SHAPES, ATTN_SMOKE):
        part.item(name, _bench_attention, *shape, min_left=10)
        r = part.data.get(name)
        if isinstance(r, dict) and "kernel_TFLOPs" in r:
            log(f"attention {name}: {r['kernel_TFLOPs']} TFLOP/s, flash x{r.get('ratio_vs_flash')}, "
                f"cudnn x{r.get('ratio_vs_cudnn')}, err/bf16 {r.get('err_ratio_vs_plain_bf16')} (<= 2)")


def _bench_attention(B, H, Lq, Lk, D, docs) -> dict:
    from smdm import kernels as K
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qs = ks = None
    if docs:
        ks = (torch.arange(Lk, device=DEV) * docs // Lk).to(torch.int32).expand(B, Lk).contiguous()
        qs = ks[:, Lk - Lq :].contiguous()
    q = torch.empty(B, H, Lq, D, device=DEV, dtype=torch.bfloat16)
    k = torch.empty(B, H, Lk, D, device=DEV, dtype=torch.bfloat16)
    v = torch.empty(B, H, Lk, D, device=DEV, dtype=torch.bfloat16)

    def setup():  # fresh random inputs in place, each repetition
        for t in (q, k, v):
            t.normal_()
        return q, k, v

    flops = 4 * B * H * Lq * Lk * D  # dense, bidirectional (document masking does less useful work)
    res = {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "documents": docs, "flops": flops}
    kern = cuda_time(
        lambda q, k, v: K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend=KERNEL), setup, reps=10
    )
    res["kernel"] = kern
    res["kernel_TFLOPs"] = round(flops / (kern["median_ms"] * 1e-3) / 1e12, 1 if not SMOKE else 6)
    if not docs:
        for bname, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    r = cuda_time(lambda q, k, v: sdpa(q, k, v), setup, reps=10)
                res[bname] = r
                res[f"{bname}_TFLOPs"] = round(flops / (r["median_ms"] * 1e-3) / 1e12, 1)
                res[f"ratio_vs_{bname}"] = round(r["median_ms"] / kern["median_ms"], 3)
            except Exception as e:  # no such backend here (CPU smoke run, an old GPU): reported
                if _cuda_fatal(e):
                    raise
                res[bname] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    else:  # baseline with a boolean document mask (SDPA efficient backend)
        mask = qs[:, None, :, None] == ks[:, None, None, :]
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                r = cuda_time(lambda q, k, v: sdpa(q, k, v, attn_mask=mask), setup, reps=10)
            res["sdpa_efficient_masked"] = r
            res["ratio_vs_sdpa_efficient_masked"] = round(r["median_ms"] / kern["median_ms"], 3)
        except Exception as e:
            if _cuda_fatal(e):
                raise
            res["sdpa_efficient_masked"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    try:
        _attention_error(res, K, *setup(), qs, ks)  # fresh inputs
    except Exception as e:  # the timings above stay recorded
        if _cuda_fatal(e):
            raise
        res["accuracy"] = f"error: {type(e).__name__}: {e}"[:300]
    return res


def _attention_error(res, K, q, k, v, qs, ks):
    ref = K.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, out_dtype=torch.float32)
    out = K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend=KERNEL).float()
    from smdm.kernels._reference import attention_plain

    res["finite"] = bool(torch.isfinite(out).all())
    err = res["max_abs_err_vs_fp32"] = float((out - ref).abs().max())
    # the tests' criterion (flash-attention's): the kernel's error vs fp32 at most 2x plain PyTorch's in bf16
    plain = attention_plain(q, k, v, q_segment_ids=qs, k_segment_ids=ks).float()
    res["max_abs_err_plain_bf16"] = float((plain - ref).abs().max())
    res["err_ratio_vs_plain_bf16"] = round(err / max(res["max_abs_err_plain_bf16"], 1e-12), 2)  # target <= 2
    # SDPA's math backend, for reference: it computes bf16 inputs in float32 and rounds once, so a ratio near
    # 1 against it is as good as a kernel can get
    mask = None if qs is None else qs[:, None, :, None] == ks[:, None, None, :]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        via_math = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()
    res["max_abs_err_sdpa_math"] = float((via_math - ref).abs().max())
    res["err_ratio_vs_sdpa_math"] = round(err / max(res["max_abs_err_sdpa_math"], 1e-12), 2)


# ------------------------------------------------------------------------------------------------------------
def _model_on_device(M, cfg, dtype):
    """A freshly initialised model built directly on the device (not on the CPU and copied: the 1028M
    model's CPU init takes tens of seconds), then cast; random weights are all a timing needs."""
    torch.manual_seed(0)
    with torch.device(DEV):
        net = M.Transformer(cfg)
    return net.to(dtype)


def child_generate(part: Part, ctx: dict) -> None:
    """Generated tokens per second (prompt tokens not counted: GenerationOutput.generated_tokens) of MDM
    samplers vs the ARM twin with its static KV cache, same prompts and length, batch 8. Wall clock with
    synchronize around whole generate() calls (host overhead is part of generation); one identical warm-up
    call, then the median of up to 3 timed calls."""
    from smdm import kernels as K
    from smdm import model as M

    name, V = pick(("1028M", 32000), ("tiny", 512))
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    batch, prompt_len, gen, block = pick((8, 64, 256, 32), (4, 8, 16, 8))
    refresh = pick(4, 2)  # of 8 steps per block on the GPU; smoke: 2 steps per block, so one refresh is hit
    prompts = [[1] + [100 + (7 * i + 13 * j) % (V - 200) for j in range(prompt_len - 1)] for i in range(batch)]
    part.data.update(config=name, batch=batch, prompt_len=prompt_len, gen_length=gen, dtype=str(dtype),
                     kernels_available=DEV == "cuda" and os.environ.get("SMDM_KERNELS") != "reference"
                     and K.available())
    t = time.perf_counter()
    mdm = _model_on_device(M, M.config_by_name(name, vocab_size=V, causal=False), dtype).eval()
    arm = _model_on_device(M, M.config_by_name(name, vocab_size=V, causal=True), dtype).eval()
    sync()
    part.data["init_seconds"] = round(time.perf_counter() - t, 2)
    part.save()
    runs = [
        # label, model, kwargs, SMDM_KERNELS
        ("arm kv-cache", arm, {}, "auto"),
        ("mdm steps=gen/4", mdm, dict(steps=gen // 4, block_length=gen), "auto"),
        ("mdm steps=gen/4 SMDM_KERNELS=reference", mdm, dict(steps=gen // 4, block_length=gen),
         "reference"),  # SDPA and the PyTorch sampler: what the fused kernels gain
        (f"mdm blocks {block} prefix-cache steps=gen/4", mdm,
         dict(steps=gen // 4, block_length=block, cache="prefix"), "auto"),
        (f"mdm blocks {block} dual-cache steps=gen/4", mdm,
         dict(steps=gen // 4, block_length=block, cache="dual"), "auto"),
        (f"mdm blocks {block} dual-cache refresh {refresh} steps=gen/4", mdm,  # the CPU's speed-quality pick
         dict(steps=gen // 4, block_length=block, cache="dual", cache_refresh=refresh), "auto"),
        ("mdm steps=gen", mdm, dict(steps=gen, block_length=gen), "auto"),
    ]
    if forced_reference():  # every run takes the references (no child retries the build); the labels say so
        part.data["kernels_forced_reference"] = True
        runs = [(lb if "SMDM_KERNELS" in lb else f"{lb} SMDM_KERNELS=reference", net, kw, "reference")
                for lb, net, kw, _ in runs if not (lb.endswith("SMDM_KERNELS=reference"))]
    for label, net, kw, env in runs:
        part.item(label, _time_generate, net, prompts, gen, kw, env, min_left=20)
        r = part.data.get(label)
        if isinstance(r, dict) and "tokens_per_s" in r:
            log(f"generate {label}: {r['tokens_per_s']} tok/s")
    arm_r = part.data.get(runs[0][0])  # the ARM twin
    arm_tps = arm_r.get("tokens_per_s") if isinstance(arm_r, dict) else None
    for label, *_ in runs[1:]:
        r = part.data.get(label)
        if arm_tps and isinstance(r, dict) and "tokens_per_s" in r:
            r["over_arm"] = sig3(r["tokens_per_s"] / arm_tps)
    part.save()


def _time_generate(net, prompts, gen, kw, env) -> dict:
    from smdm import sampling as S

    old = os.environ.get("SMDM_KERNELS")
    os.environ["SMDM_KERNELS"] = env
    try:
        with torch.no_grad():
            t = time.perf_counter()
            S.generate(net, prompts, gen_length=gen, seed=0, batch_invariant=False, **kw)  # warm-up, same shapes
            sync()
            warm = time.perf_counter() - t
            times, o = [], None
            for _ in range(pick(3, 1)):
                if times and left() < 3 * warm + 10:
                    break
                sync()
                t = time.perf_counter()
                o = S.generate(net, prompts, gen_length=gen, seed=1 + len(times), batch_invariant=False, **kw)
                sync()
                times.append(time.perf_counter() - t)
    finally:
        if old is None:
            os.environ.pop("SMDM_KERNELS", None)
        else:
            os.environ["SMDM_KERNELS"] = old
    dt = statistics.median(times)
    return {"seconds": round(dt, 4), "times_s": [round(x, 4) for x in times], "warmup_s": round(warm, 3),
            "generated_tokens": o.generated_tokens, "tokens_per_s": round(o.generated_tokens / dt, 1),
            "forward_passes": o.forward_passes, "SMDM_KERNELS": env, **kw}


TRAIN_DOCS = 4  # documents per window of the document-masked measurements (boundaries drawn per window)


def child_train(part: Part, ctx: dict) -> None:
    """The unmasked steps, the same with the plain head + CE (smdm.linear_ce's baseline), then the same steps on
    document-masked windows (what `smdm train` trains on):
    SDPA with the dense (B, 1, L, L) mask (its efficient backend) vs FlexAttention's block mask (compiled at
    the first warm-up step; flex last: its compile is the longest item and a late kill costs only it)."""
    part.item("steps", _bench_train, ctx, min_left=20)
    if forced_reference():  # smdm.linear_ce runs its plain form
        part.data["chunked_ce"] = "not compared: SMDM_KERNELS=reference (the kernel build failed)"
        part.save()
    else:  # the baseline of smdm.linear_ce: the loss's head + CE through all masked rows' logits at once
        part.item("steps, plain CE", _bench_train, ctx, plain_ce=True, min_left=20)
    chunked, plain = part.data.get("steps"), part.data.get("steps, plain CE")
    if all(isinstance(x, dict) and "tokens_per_s" in x for x in (chunked, plain)):
        plain["chunked_ce_speedup"] = round(chunked["tokens_per_s"] / plain["tokens_per_s"], 3)
        if chunked["peak_memory_GiB"] is not None and plain["peak_memory_GiB"] is not None:
            plain["chunked_ce_saves_GiB"] = round(plain["peak_memory_GiB"] - chunked["peak_memory_GiB"], 1)
        part.save()
    for impl in ("sdpa", "flex"):
        part.item(f"doc-masked {impl}", _bench_train, ctx, docs=TRAIN_DOCS, attention=impl,
                  min_left=45 if impl == "flex" else 20)
    sdpa, flex = part.data.get("doc-masked sdpa"), part.data.get("doc-masked flex")
    if isinstance(sdpa, dict) and isinstance(flex, dict) and "tokens_per_s" in sdpa and "tokens_per_s" in flex:
        flex["speedup_vs_sdpa_masked"] = round(flex["tokens_per_s"] / sdpa["tokens_per_s"], 3)
        part.save()
    for name in ("steps", "steps, plain CE", "doc-masked sdpa", "doc-masked flex"):
        r = part.data.get(name)
        if isinstance(r, dict) and "tokens_per_s" in r:
            log(f"train {name}: {r['tokens_per_s']} tok/s, MFU {r['mfu']}")


_TRAIN_NET: dict = {}  # the child's one model and optimizer, shared by its items (a 1028M init each is seconds)


def _train_net(cfg):
    if "net" not in _TRAIN_NET:
        from smdm import model as M

        t = time.perf_counter()
        net = _model_on_device(M, cfg, torch.float32).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=DEV == "cuda")
        sync()
        _TRAIN_NET.update(net=net, opt=opt, init_s=time.perf_counter() - t)
        return net, opt, _TRAIN_NET["init_s"]
    return _TRAIN_NET["net"], _TRAIN_NET["opt"], 0.0


def _bench_train(ctx: dict, docs: int = 0, attention: str = "auto", plain_ce: bool = False) -> dict:
    """`_train_steps`; plain_ce: with the losses' head + CE through all rows' logits at once
    (`linear_cross_entropy_reference`) instead of the chunked `smdm.linear_ce` the trainer runs."""
    from smdm import diffusion
    from smdm.linear_ce import linear_cross_entropy_reference

    chunked = diffusion._linear_ce
    if plain_ce:
        diffusion._linear_ce = linear_cross_entropy_reference
    try:
        return {**_train_steps(ctx, docs, attention),
                "loss_head_ce": "plain" if plain_ce or forced_reference() else "smdm.linear_ce"}
    finally:
        diffusion._linear_ce = chunked


def _train_steps(ctx: dict, docs: int, attention: str) -> dict:
    """Training steps of the MDM objective as `smdm train` runs them (forward process on the CPU, output head
    and CE at masked rows only, in chunks by smdm.linear_ce, bf16 autocast over fp32 master weights, fused
    AdamW, grad clipping); with `docs`, packed windows of that many documents (segment ids, fresh boundaries
    each step) and model.attention = `attention`. The smoke run's flex item runs the forward pass only:
    FlexAttention has no CPU backward."""
    from smdm import diffusion
    from smdm import model as M

    name, V = pick(("1028M", 32000), ("tiny", 512))
    cfg = M.config_by_name(name, vocab_size=V, causal=False)
    net, opt, init_s = _train_net(cfg)
    net.attention = attention
    backward = not (attention == "flex" and DEV != "cuda")
    B, L = pick((4, 2048), (2, 64))
    gen = torch.Generator().manual_seed(0)
    it = iter(range(10**9))
    fp = diffusion.forward_process
    try:
        from smdm import _core  # noqa: F401
        fp_name = "numpy reference (SMDM_KERNELS=reference)" if forced_reference() else "rust"
    except ImportError:  # not carried / not loadable here: the numpy definition (same values, slower; untimed)
        fp_name = "numpy reference (smdm._core unavailable)"

        def fp(ids, **kw):
            noisy, mask, t_, p_, weight, length, uncond = diffusion.forward_process_reference(ids.numpy(), **kw)
            return diffusion.NoisyBatch(noisy_ids=torch.from_numpy(noisy).long(), mask=torch.from_numpy(mask),
                                        t=torch.from_numpy(t_), p=torch.from_numpy(p_),
                                        weight=torch.from_numpy(weight), length=int(length),
                                        uncond=torch.from_numpy(uncond))
    masked, pairs = [], []

    def segments():
        """(B, L) document ids: `docs` documents per window, boundaries at distinct random positions."""
        cuts = torch.rand(B, L - 1, generator=gen).argsort(dim=1)[:, :docs - 1] + 1  # (B, docs-1) in [1, L)
        starts = torch.zeros(B, L, dtype=torch.long).scatter_(1, cuts, 1)
        seg = starts.cumsum(1)
        counts = torch.stack([torch.bincount(row, minlength=docs) for row in seg]).double()  # (B, docs)
        pairs.append(float((counts**2).sum() / (B * L * L)))  # fraction of (query, key) pairs attended
        return seg.to(DEV)

    def batch():
        ids = torch.randint(0, V, (B, L), generator=gen)
        b = fp(ids, seed=0, step=next(it), mask_id=cfg.mask_id, crop_prob=0.0)
        masked.append(int(b.mask.sum()))
        return (b.noisy_ids.to(DEV), ids.to(DEV), b.mask.to(DEV), b.weight.to(DEV),
                segments() if docs else None)

    def step(noisy, x0, mask, weight, seg):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"), \
                torch.set_grad_enabled(backward):
            loss = diffusion.mdm_loss(net, noisy, x0, mask, weight, segment_ids=seg)
        if backward:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step(*batch())  # the first step: compiles FlexAttention (and warms the rest)
    sync()
    first_s = time.perf_counter() - t
    r = cuda_time(step, batch, reps=pick(8, 2), warmup=2)
    timed_masked = masked[-r["reps"]:]
    pair_frac = statistics.mean(pairs[-r["reps"]:]) if docs else 1.0
    d, n_layer = cfg.d_model, cfg.n_layer
    n_non_emb = cfg.non_embedding_params()
    step_s = r["median_ms"] * 1e-3
    tokens = B * L
    # bidirectional scores + values (4 L d per token-layer), fwd + bwd, over the attended pairs only
    attn = 12 * n_layer * L * d * tokens * pair_frac
    head = 6 * d * V * statistics.mean(timed_masked)  # the output head runs at masked rows only
    flops = 6 * n_non_emb * tokens + attn + head
    peak = ctx.get("peak_TFLOPs") or ctx.get("bf16_gemm_TFLOPs") or 989.0
    gemm = ctx.get("bf16_gemm_TFLOPs")
    res = {"config": name, "batch": B, "seq_len": L, "params_non_embedding": n_non_emb,
           "init_seconds": round(init_s, 2), "attention": attention, "documents_per_window": docs or 1,
           "attended_pairs_fraction": round(pair_frac, 4), "backward": backward,
           "first_step_seconds": round(first_s, 2),
           "forward_process": fp_name, "masked_fraction": round(statistics.mean(timed_masked) / tokens, 3),
           "step": r, "tokens_per_s": round(tokens / step_s, 1 if SMOKE else 0),
           "model_TFLOPs": round(flops / step_s / 1e12, 1 if not SMOKE else 6),
           "flops_formula": "6*N_non_emb*tokens + 12*n_layer*L*d*tokens*attended_pairs_fraction (attention, "
                            "bidirectional, fwd+bwd, the pairs a document mask leaves) + 6*d*V*masked_tokens "
                            "(head at masked rows)",
           "peak_TFLOPs": peak, "peak_source": ctx.get("peak_source", "?"),
           "mfu": sig3(flops / step_s / (peak * 1e12)),
           "mfu_6N": sig3(6 * n_non_emb * tokens / step_s / (peak * 1e12)),
           "mfu_vs_measured_gemm": sig3(flops / step_s / (gemm * 1e12)) if gemm else None,
           "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None}
    if docs:  # the tiles FlexAttention skips for a batch's layout (SDPA computes them all); not
        # BlockMask.sparsity(), which torch 2.11 gets wrong (negative) for a window shorter than a tile
        bm = net._block_mask(B, L, DEV, segment_ids=segments(), key_valid=None).block_mask
        tiles = B * bm.kv_indices.shape[-2] * bm.kv_indices.shape[-1]  # (B, 1, q tiles, k tiles)
        visited = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
        res["block_sparsity_percent"] = round(100 * (1 - visited / tiles), 1)
    if not backward:
        res["note"] = "smoke run on the CPU: forward only (FlexAttention has no CPU backward)"
    return res


SECTIONS = {"build": child_build, "sampler": child_sampler, "attention": child_attention,
            "generate": child_generate, "train": child_train, "sampler_compiled": child_sampler_compiled}


# ------------------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------------------
class Stop(BaseException):  # not an Exception: no section's `except Exception` may swallow it
    """SIGTERM / SIGINT: stop the child, save, print the table."""


_CHILD: subprocess.Popen | None = None


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the child's own group: its compile workers too
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _spawn(cmd: list, log_path: Path, env: dict, timeout: float, header: str) -> tuple:
    """Run cmd with stdout+stderr appended to log_path; (returncode, timed_out, seconds)."""
    global _CHILD
    with open(log_path, "a") as f:
        f.write(f"\n##### {header} | {' '.join(cmd)} | {time.strftime('%H:%M:%S')}\n")
        f.flush()
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # its own process group (process_group= is Python >= 3.11)
        _CHILD = p
        try:
            rc, timed_out = p.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            _kill(p)
            rc, timed_out = p.returncode, True
        except BaseException:  # Stop (SIGTERM / SIGINT): take the child down with us
            _kill(p)
            raise
        finally:
            _CHILD = None
    return rc, timed_out, time.perf_counter() - t


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*EXTRA_PATHS, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))  # ninja jobs of the JIT build
    env.update(extra or {})
    return env


def _rc_text(rc) -> str:
    if rc is None:
        return "no exit code"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(ln[:300] for ln in lines[-n:])


class Suite:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts = Path(tempfile.mkdtemp(prefix="smdm-gpu-suite-"))  # outside $OUT: not brought back
        self.results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": SMOKE,
                              "deadline_s": args.deadline, "sections": {}}
        self.ctx: dict = {}
        self.env_extra: dict = {}
        self.current: tuple | None = None  # (section, part file) of the running child
        self.only = set(filter(None, (args.only or "").split(","))) or None

    def save(self) -> None:
        self.results["seconds"] = round(elapsed(), 1)
        write_json(self.out / "gpu_suite.json", self.results)

    def wanted(self, name: str) -> bool:
        if self.only is not None and name not in self.only:
            return False
        if name == "tests" and self.args.skip_tests:
            return False
        if name in ("generate", "train") and self.args.skip_model:
            return False
        return True

    def status(self, name: str, status: str, seconds: float, **kw) -> None:
        est = PLAN.get(name, (None,))[0]
        self.results["sections"][name] = {"status": status, "seconds": round(seconds, 1), "estimate_h100_s": est,
                                          **kw}
        self.save()

    def inline(self, name: str, fn) -> dict:
        log(f"--- {name}")
        t = time.perf_counter()
        try:
            if FAULTS.get(name, (None,))[0] == "raise":
                raise RuntimeError(f"forced failure (--fail {name}:raise)")
            r = fn()
            status = "ok"
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            status = "error"
            log(f"{name} failed: {r['error']}")
        self.results[name] = r
        self.status(name, status, time.perf_counter() - t)
        return r

    def skip(self, name: str, why: str) -> None:
        log(f"--- {name}: skipped ({why})")
        self.results[name] = {"status": f"skipped: {why}"}
        self.status(name, "skipped", 0.0, why=why)

    def budget(self, name: str) -> float | None:
        """The child's time limit, or None when the section no longer fits before the deadline."""
        est, cap, min_start, reserve = PLAN[name]
        if SMOKE:  # tiny sections (and the fault-injection tests stay short)
            min_start, reserve = 5, 0
        avail = left() - 5  # 5 s to save and print the table
        if avail < min_start:
            return None
        return float(min(cap, avail, max(min_start, avail - reserve)))

    def child(self, name: str) -> None:
        limit = self.budget(name)
        if limit is None:
            return self.skip(name, f"deadline ({left():.0f} s left, needs {5 if SMOKE else PLAN[name][2]} s)")
        log(f"--- {name} (child process, limit {limit:.0f} s)")
        part_file = self.parts / f"{name}.json"
        self.current = (name, part_file)
        log_path = self.out / LOG_NAMES["build" if name == "build" else "bench"]
        t0 = time.perf_counter()
        restarts, note = 0, None
        while True:
            remaining = limit - (time.perf_counter() - t0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--part", str(part_file),
                   "--deadline-at", repr(min(DEADLINE_AT, time.time() + remaining - 2)), "--ctx", json.dumps(self.ctx)]
            cmd += ["--smoke"] if SMOKE else []
            for f in self.args.fail or []:
                cmd += ["--fail", f]
            rc, timed_out, secs = _spawn(cmd, log_path, _child_env(self.env_extra), remaining, name)
            data = json.loads(part_file.read_text()) if part_file.exists() else {}
            running = data.pop("_running", None)
            if timed_out:
                msg = f"killed at its time limit ({limit:.0f} s)" + (f" while running {running!r}" if running else "")
                if running:
                    data[running] = {"error": msg}
                data["error"] = msg
                break
            if rc == 0:
                break
            if running:  # died inside an item (crash, abort): that item is the culprit
                data[running] = {"error": f"child process died ({_rc_text(rc)}) in this item"}
            again = rc == 3 or running is not None
            again = again and restarts < 3 and limit - (time.perf_counter() - t0) > PLAN[name][2] / 2
            if again:
                restarts += 1
                note = f"restarted {restarts}x after a CUDA error or crash ({_rc_text(rc)})"
                log(f"{name}: {_rc_text(rc)}" + (f" in {running!r}" if running else "") + "; restarting the child")
                data.pop("error", None)
                data.pop("traceback", None)
                write_json(part_file, data)
                continue
            data.setdefault("error", f"child process {_rc_text(rc)}")
            break
        if note:
            data["restarts"] = note
        self.results[name] = data
        bad = [k for k, v in data.items() if isinstance(v, dict) and "error" in v]
        status = "error" if "error" in data else ("partial" if bad else "ok")
        self.status(name, status, time.perf_counter() - t0, **({"failed_items": bad} if bad else {}))
        if status != "ok":
            err = data.get("error") or f"items failed: {', '.join(bad)}"
            log(f"{name}: {status}: {str(err)[:300]}\n{_log_tail(log_path)}")

    def tests(self) -> None:
        limit = self.budget("tests")
        if limit is None:
            return self.skip("tests", f"deadline ({left():.0f} s left)")
        env = _child_env(self.env_extra)
        find = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
        if not find("pytest"):
            return self.skip("tests", "pytest not importable (pip install --target .gpu_pkgs pytest pytest-timeout)")
        log(f"--- tests (pytest -m gpu, limit {limit:.0f} s)")
        junit = self.out / "pytest-junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
               f"--junitxml={junit}", "-W", "ignore::pytest.PytestConfigWarning"]
        if find("pytest_timeout"):  # a hung kernel: stack dump and exit instead of eating the section
            cmd += ["-o", "timeout=120", "-o", "timeout_method=thread"]
        # warnings are reported, not errors, on the GPU's one-shot run (a new inductor/cuDNN warning must not cost
        # a test; CI keeps them errors); this also drops the ini's filter naming pytest_benchmark's class, which
        # is a config error where pytest-benchmark is not installed
        cmd += ["-o", "filterwarnings=default\nignore::DeprecationWarning\nignore::pytest.PytestConfigWarning"]
        # test_model.py last: its FlexAttention test compiles three models on a cold cache (estimated 60-150 s,
        # its own 300 s limit); a timeout there (pytest-timeout's thread method ends the whole run) or the
        # section's limit then costs only that test, and -v leaves every finished test's outcome in the log
        cmd += ["tests/test_kernels.py", "tests/test_linear_ce.py",
                "tests/test_train.py::test_gpu_all_reduce_under_nccl_takes_cpu_tensors", "tests/test_model.py"]
        rc, timed_out, secs = _spawn(cmd, self.out / LOG_NAMES["tests"], env, limit, "tests")
        text = (self.out / LOG_NAMES["tests"]).read_text(errors="replace")
        text = text[text.rfind("##### tests"):]
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        r = {"command": " ".join(cmd), "returncode": rc, "timed_out": timed_out,
             "summary": lines[-1] if lines else "(no output)",
             "failed": [ln[:300] for ln in lines if ln.startswith(("FAILED", "ERROR"))][:40]}
        r.update(_junit_counts(junit) or _verbose_counts(text))
        self.results["tests"] = r
        ok = rc == 0 and not timed_out
        self.status("tests", "ok" if ok else ("killed" if timed_out else "failed"), secs)
        log(f"tests: {r['summary']}" + ("" if ok else "\n" + _log_tail(self.out / LOG_NAMES["tests"], 30)))


def _verbose_counts(text: str) -> dict:
    """Outcome counts from pytest -v lines ("path::test PASSED [ 3%]"), for a run killed before its JUnit file."""
    out = {k: len(re.findall(rf"::\S+ {k}\b", text)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"from_log": True, "passed": out["PASSED"], "failures": out["FAILED"], "errors": out["ERROR"],
            "skipped": out["SKIPPED"]}


def _junit_counts(path: Path) -> dict:
    try:
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
        s = root if root.tag == "testsuite" else root.find("testsuite")
        return {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except Exception:
        return {}


def run_suite(args) -> int:
    global _SUITE_LOG
    s = Suite(args)
    _SUITE_LOG = s.out / LOG_NAMES["suite"]
    _SUITE_LOG.write_text("")
    for key in ("build", "tests", "bench"):
        (s.out / LOG_NAMES[key]).unlink(missing_ok=True)
    (s.out / "pytest-junit.xml").unlink(missing_ok=True)

    def on_signal(signum, frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"gpu_suite: deadline {args.deadline:.0f} s, results in {s.out}")
    try:
        env = s.inline("env", section_env)
        if s.wanted("ceilings"):
            ceil = s.inline("ceilings", section_ceilings)
        else:
            ceil = {}
        # the ratios' denominators, measured on this card; without them no fraction of the copy rate is
        # reported (an assumed H100 figure would overstate an H200's fraction by 1.4x)
        s.ctx["copy_GBps"] = ceil.get("copy_GBps")
        s.ctx["bf16_gemm_TFLOPs"] = ceil.get("bf16_gemm_TFLOPs")
        nominal = env.get("peak_bf16_dense_TFLOPs") if isinstance(env, dict) else None
        s.ctx["peak_TFLOPs"] = nominal or ceil.get("bf16_gemm_TFLOPs") or 989.0
        s.ctx["peak_source"] = ("datasheet dense bf16" if nominal else
                                "measured GEMM" if ceil.get("bf16_gemm_TFLOPs") else "H100 datasheet (default)")
        kernels_ok = True
        for name in ORDER:
            if not s.wanted(name):
                continue
            if name in NEEDS_KERNELS and not kernels_ok:
                s.skip(name, "the kernel build failed (see build.log)")
                continue
            if name == "tests":
                s.tests()
            else:
                s.child(name)
            if name == "build":
                b = s.results.get("build", {})
                if b.get("backend") == "nvrtc" and "nvcc_error" in b:
                    s.env_extra["SMDM_KERNEL_BUILD"] = "nvrtc"  # later children (pytest too) use NVRTC
                # smoke: no build to make (the references stand in), but an injected build failure counts
                kernels_ok = "error" not in b and (SMOKE or "backend" in b)
                if not kernels_ok:  # no child may retry the failed build (minutes each): references only
                    s.env_extra["SMDM_KERNELS"] = "reference"
                    s.results["kernels_unavailable"] = "later sections ran with SMDM_KERNELS=reference"
            s.current = None
    except Stop as e:
        log(f"stopped by {e}: the running child was killed; saving")
        s.results["stopped"] = str(e)
        if s.current is not None and s.current[1].exists():  # what the interrupted child had recorded
            data = json.loads(s.current[1].read_text())
            running = data.pop("_running", None)
            data["error"] = f"stopped by {e}" + (f" while running {running!r}" if running else "")
            s.results[s.current[0]] = data
            s.results["sections"][s.current[0]] = {"status": "stopped", "seconds": None}
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        s.save()
        for key in LOG_NAMES:  # the device tool brings back files of at most 16 MiB
            _cap_file(s.out / LOG_NAMES[key])
        shutil.rmtree(s.parts, ignore_errors=True)  # the children's part files, merged into the results by now
    print_table(s.results)
    print(f"full results: {s.out / 'gpu_suite.json'} (logs: {', '.join(LOG_NAMES.values())})", flush=True)
    return 0


def _cap_file(path: Path) -> None:
    try:
        if path.stat().st_size > MAX_LOG_BYTES:
            data = path.read_bytes()
            half = MAX_LOG_BYTES // 2
            path.write_bytes(data[:half] + b"\n[... cut to fit 16 MiB ...]\n" + data[-half + 64:])
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------------------
def _fmt(x, spec: str = "") -> str:
    if x is None or x == "-":
        return "-"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def print_table(r: dict) -> None:
    env = r.get("env", {}) if isinstance(r.get("env"), dict) else {}
    print(f"\n== smdm GPU suite: {env.get('gpu')} | torch {env.get('torch')} | CUDA {env.get('cuda')} "
          f"| {r.get('seconds')} s (deadline {r.get('deadline_s')}) ==")
    secs = r.get("sections", {})
    print("sections: " + ", ".join(f"{k} {v['status']} {_fmt(v.get('seconds'), '.0f')}s" for k, v in secs.items()))
    b = r.get("build")
    if isinstance(b, dict) and "status" in b:
        print(f"build: {b['status']}")
    elif isinstance(b, dict):
        print(f"build: {b.get('backend', 'FAILED')} {b.get('seconds', '')} s"
              + (f" (nvcc failed: {str(b.get('nvcc_error'))[:150]})" if b.get("nvcc_error") else "")
              + (f" ERROR {str(b.get('error'))[:300]}" if b.get("error") else ""))
    t = r.get("tests", {})
    if isinstance(t, dict) and "summary" in t:
        print(f"tests (pytest -m gpu): {t['summary']}")
        for ln in t.get("failed", [])[:12]:
            print(f"  {ln[:160]}")
    c = r.get("ceilings", {})
    if isinstance(c, dict) and "copy_GBps" in c:
        print(f"ceilings: copy {c['copy_GBps']} GB/s, bf16 GEMM {c['bf16_gemm_TFLOPs']} TFLOP/s "
              f"(datasheet dense bf16 {env.get('peak_bf16_dense_TFLOPs')})")
    for name in ("sampler", "attention", "generate", "train", "sampler_compiled"):
        sec = r.get(name)
        if isinstance(sec, dict) and sec.get("error"):
            print(f"{name}: ERROR {str(sec['error'])[:300]}")
    if "sampler" in r:
        print(f"{'sampler (target x copy >= 0.7, x eager >= 5)':44s} {'ms':>8s} {'GB/s':>7s} {'x copy':>7s} "
              f"{'x eager':>8s} exact")
    for name, s in _items(r.get("sampler")):
        if isinstance(s, dict) and "kernel" in s:
            print(f"  {name:42s} {s['kernel']['median_ms']:8.3f} {_fmt(s.get('kernel_GBps'), '7.0f')} "
                  f"{_fmt(s.get('fraction_of_copy_bw'), '7.2f')} {_fmt(s.get('speedup_vs_eager')):>8s} "
                  f"{s.get('identical_to_reference')}")
        else:
            print(f"  {name:42s} {_short(s)}")
    if isinstance(r.get("sampler"), dict) and "kernel" in str(r["sampler"]) and \
            not r["sampler"].get("copy_GBps_denominator"):
        print("  (x copy: -, no copy rate was measured in this run: the ceilings section did not run or failed)")
    sc = r.get("sampler_compiled")
    for _name, s in _items(sc):
        if isinstance(s, dict) and "kernel" in s:
            print(f"  rows only vs torch.compile: kernel {s['kernel']['median_ms']:.3f} ms, "
                  f"x compiled {s.get('speedup_vs_compiled', _short(s.get('compiled_reference')))}, "
                  f"agreement {s.get('compiled_token_agreement', '-')}")
        else:
            print(f"  rows only vs torch.compile: {_short(s)}")
    if "attention" in r:
        print(f"{'attention bf16 (target x flash >= 1, x cudnn >= 0.9)':44s} {'ms':>8s} {'TFLOP/s':>7s} "
              f"{'x flash':>7s} {'x cudnn':>8s} {'err/bf16':>8s}")
    for name, s in _items(r.get("attention")):
        if isinstance(s, dict) and "kernel" in s:
            xf = _fmt(s["ratio_vs_flash"]) if "ratio_vs_flash" in s else (
                _fmt(s.get("ratio_vs_sdpa_efficient_masked")) + "e")  # flash takes no mask: see the note below
            print(f"  {name:42s} {s['kernel']['median_ms']:8.3f} {_fmt(s.get('kernel_TFLOPs'), '7.1f')} "
                  f"{xf:>7s} {_fmt(s.get('ratio_vs_cudnn')):>8s} {_fmt(s.get('err_ratio_vs_plain_bf16')):>8s}")
        else:
            print(f"  {name:42s} {_short(s)}")
    if any(isinstance(s, dict) and "ratio_vs_sdpa_efficient_masked" in s and "ratio_vs_flash" not in s
           for _, s in _items(r.get("attention"))):
        print("  (e: x SDPA's efficient backend with the document mask: the flash backend takes no mask)")
    g = r.get("generate")
    if isinstance(g, dict) and "config" in g:
        print(f"generation {g.get('config')} batch {g.get('batch')}, {g.get('gen_length')} new tokens "
              f"({g.get('dtype')}; target MDM >= 1.4x ARM):")
        for k, v in _items(g):
            if isinstance(v, dict) and "tokens_per_s" in v:
                print(f"  {k:50s} {v['tokens_per_s']:10.1f} tok/s  x ARM {v.get('over_arm', '-')}")
            else:
                print(f"  {k:42s} {_short(v)}")
    tr = r.get("train")
    items = _items(tr)
    first = next((v for _, v in items if isinstance(v, dict) and "tokens_per_s" in v), None)
    if first is not None:
        print(f"training {first['config']} {first['batch']}x{first['seq_len']} (target MFU >= 0.5; MFU of "
              f"{first['peak_TFLOPs']} TFLOP/s, attention FLOPs of the attended pairs only):")
        print(f"  {'':32s} {'tok/s':>9s} {'MFU':>6s} {'6N':>6s} {'x GEMM':>6s} {'mem GiB':>7s} {'1st step s':>10s} "
              f"{'skip %':>6s} {'x sdpa':>6s}")
    for k, v in items:
        if isinstance(v, dict) and "tokens_per_s" in v:
            cols = [(v["mfu"], "6.3f", 6), (v["mfu_6N"], "6.3f", 6), (v["mfu_vs_measured_gemm"], "6.3f", 6),
                    (v["peak_memory_GiB"], "7.1f", 7), (v.get("first_step_seconds"), "10.1f", 10),
                    (v.get("block_sparsity_percent"), "6.1f", 6), (v.get("speedup_vs_sdpa_masked"), "6.2f", 6)]
            print(f"  {k:32s} {v['tokens_per_s']:9.0f} " + " ".join(f"{_fmt(x, f):>{w}s}" for x, f, w in cols))
        else:
            print(f"training {k}: {_short(v)}")
    plain = tr.get("steps, plain CE") if isinstance(tr, dict) else None
    if isinstance(plain, dict) and "chunked_ce_speedup" in plain:
        print(f"  loss head + CE chunked (smdm.linear_ce) over plain: tokens/s x{plain['chunked_ce_speedup']}, "
              f"peak memory {_fmt(plain.get('chunked_ce_saves_GiB'))} GiB less")
    if r.get("stopped"):
        print(f"(stopped early by {r['stopped']})")
    if r.get("smoke"):
        print("(smoke run on CPU: the script's code paths only; every number above is meaningless)")


def _items(sec):
    """The items of a section's results (dict entries that are results, not metadata)."""
    if not isinstance(sec, dict):
        return []
    if "status" in sec and len(sec) == 1:
        return [("(section)", sec["status"])]
    return [(k, v) for k, v in sec.items()
            if isinstance(v, dict) and ("kernel" in v or "tokens_per_s" in v or "error" in v)
            or isinstance(v, str) and v.startswith("skipped")]


def _short(v) -> str:
    if isinstance(v, dict):
        return f"ERROR {str(v.get('error'))[:140]}" if "error" in v else str(v)[:140]
    return str(v)[:140]


# ------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benches/results",
                    help="directory for gpu_suite.json and the logs ($OUT when set)")
    ap.add_argument("--deadline", type=float, default=500.0,
                    help="seconds for the whole run (default 500: a 540 s device call with room to spare)")
    ap.add_argument("--only", help="comma-separated sections (env always runs): ceilings," + ",".join(ORDER))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-model", action="store_true", help="skip generate and train")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny shapes (checks this script)")
    ap.add_argument("--fail", action="append", help="SECTION:MODE[:ITEM] fault injection (tests of the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global SMOKE, DEV, KERNEL, DEADLINE_AT
    for spec in [*(args.fail or []), *filter(None, os.environ.get("SMDM_SUITE_FAIL", "").split(","))]:
        sec, _, rest = spec.partition(":")
        mode, _, item = rest.partition(":")
        FAULTS[sec] = (mode or "raise", item or None)
    if args.smoke:
        SMOKE, DEV, KERNEL = True, "cpu", "reference"
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --smoke for a CPU dry run of the script)", file=sys.stderr)
        return 2
    if args.child:
        DEADLINE_AT = args.deadline_at or (time.time() + 600)
        child_main(args)  # exits
    DEADLINE_AT = T_START + args.deadline
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
