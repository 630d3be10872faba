# python benches/gpu_suite.py [--out DIR] [--skip-tests] [--skip-model]     (one H100: < 8 min)
# python benches/gpu_suite.py --smoke --out /tmp/s   (CPU, < 1 min: every section on tiny shapes with the
#                                                     PyTorch references; checks the script, not the GPU)
"""smdm GPU suite: builds the kernels, runs `pytest -m gpu`, measures the physical ceilings (copy bandwidth,
bf16 GEMM), then benchmarks with CUDA events (warm-up, medians, fresh random inputs per repetition):

  sampler    fused unmask_step / choose_tokens kernel vs the eager PyTorch reference and the torch.compile'd
             reference; bytes of logits read per second as a fraction of copy bandwidth (target >= 0.7) and
             the speed-up over eager (target >= 5x)
  attention  the flash kernel vs SDPA's flash and cuDNN backends, bf16, TFLOP/s (targets >= 1.0x flash,
             >= 0.9x cuDNN at L >= 1k); plus document-masked and prefix-cache shapes
  model      MDM vs ARM generation and training MFU of the 1028M model, if smdm.model / smdm.sampling exist

Writes the full results as JSON to $OUT/gpu_suite.json (or --out DIR) and prints a short table last.

--smoke runs the same sections on the CPU with tiny shapes, the references in place of the kernels and wall
clocks in place of CUDA events, so a Python error in this script is caught by the CPU test suite
(tests/test_gpu_suite.py) instead of costing a scarce GPU run. Its numbers mean nothing and are marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# python/ (smdm itself) and, when present, .gpu_pkgs/ (`pip install --target .gpu_pkgs pytest pytest-timeout`
# on the CPU machine: pure-Python test tools for a GPU machine that has no package index)
EXTRA_PATHS = [str(p) for p in (ROOT / "python", ROOT / ".gpu_pkgs") if p.is_dir()]
sys.path[:0] = EXTRA_PATHS
T0 = time.perf_counter()
BUDGET_S = 7.5 * 60  # the whole suite; sections are skipped (and say so) when the budget runs out
SMOKE = False  # --smoke: CPU, tiny shapes, references (set once by main)
DEV = "cuda"
KERNEL = "cuda"  # the `backend=` of the kernels under test ("reference" in smoke mode)


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
    return BUDGET_S - (time.perf_counter() - T0)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def cuda_time(fn, setup=None, reps: int = 10, warmup: int = 2) -> dict:
    """Median / min milliseconds of fn() with CUDA events (wall clock in smoke mode); `setup()` (untimed)
    refreshes inputs each rep."""
    if SMOKE:
        reps, warmup = min(reps, 2), min(warmup, 1)
    for _ in range(warmup):
        args = setup() if setup else ()
        fn(*args)
    sync()
    times = []
    for _ in range(reps):
        args = setup() if setup else ()
        sync()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(*args)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


# ------------------------------------------------------------------------------------------------------------
def section_env() -> dict:
    if DEV != "cuda":
        return {"gpu": "none (CPU smoke run: numbers are meaningless)", "torch": torch.__version__,
                "cpus": os.cpu_count(), "python": platform.python_version()}
    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def section_build() -> dict:
    from smdm import kernels as K

    if SMOKE:  # no CUDA here; the CPU suite compile-checks the sources (`smdm kernels check`) instead
        return {"status": "skipped: smoke run (no CUDA)"}

    t = time.perf_counter()
    mod = K.build(verbose=False)
    return {
        "seconds": round(time.perf_counter() - t, 1),
        "module": getattr(mod, "__file__", type(mod).__name__),
    }


def section_tests() -> dict:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"summary": "skipped: pytest not installed (pip install pytest)"}
    # -W: the ini's `timeout` option warns (and warnings are errors) where pytest-timeout is not installed
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd += ["-W", "ignore::pytest.PytestConfigWarning", "tests/test_kernels.py", "tests/test_model.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*EXTRA_PATHS, os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(60, min(240, left() - 200))
        )
        out = p.stdout + p.stderr
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout),
            -1,
        )
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    print(out[-6000:], flush=True)
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "summary": last[0],
        "seconds": round(time.perf_counter() - t, 1),
    }


def section_ceilings() -> dict:
    n = pick(1 << 28, 1 << 20)  # 1 GiB of float32
    src = torch.empty(n, device=DEV)
    dst = torch.empty_like(src)
    src.uniform_()
    r = cuda_time(dst.copy_, lambda: (src,), reps=20, warmup=3)
    copy_gbs = 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9  # read + write
    src = dst = None
    m = pick(8192, 256)
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    g = cuda_time(lambda: a @ b, reps=20, warmup=3)
    tflops = 2 * m**3 / (g["median_ms"] * 1e-3) / 1e12
    return {"copy_GBps": round(copy_gbs, 1 if copy_gbs > 10 else 4),
            "bf16_gemm_TFLOPs": round(tflops, 1 if tflops > 10 else 4), "gemm_n": m}


# ------------------------------------------------------------------------------------------------------------
def section_sampler(copy_gbs: float) -> dict:
    out = {}
    V = pick(32000, 1000)
    B, L = pick((32, 256), (2, 16))
    configs = [
        # name, B, L, candidate fraction, dtype, cfg, T, top_k, top_p, confidence
        ("greedy bf16", B, L, 1.0, torch.bfloat16, 0.0, 0.0, 0, 1.0, "prob"),
        ("gumbel T=1 bf16", B, L, 1.0, torch.bfloat16, 0.0, 1.0, 0, 1.0, "prob"),
        ("cfg+top-p 0.9 bf16", B // 2, L, 1.0, torch.bfloat16, 1.0, 1.0, 0, 0.9, "margin"),
        ("top-k 50 T=0.7 entropy bf16", B // 2, L, 0.5, torch.bfloat16, 0.0, 0.7, 50, 1.0, "neg_entropy"),
        ("gumbel T=1 fp32", B // 2, L, 1.0, torch.float32, 0.0, 1.0, 0, 1.0, "prob"),
    ]
    for name, *cfg in configs:
        if left() < 150:
            out[name] = "skipped: time budget"
            continue
        out[name] = _bench_sampler(name, *cfg, V=V, copy_gbs=copy_gbs)
        empty_cache()
    return out


def _bench_sampler(name, B, L, frac, dtype, cfg, T, top_k, top_p, conf, *, V, copy_gbs) -> dict:
    from smdm import kernels as K
    from smdm.kernels import _reference as R

    pool = [
        (torch.randn(B, L, V, device=DEV) * 3).to(dtype),
        (torch.randn(B, L, V, device=DEV) * 3).to(dtype),
    ]
    unc = (torch.randn(B, L, V, device=DEV) * 3).to(dtype) if cfg else None
    cand = torch.rand(B, L, device=DEV) < frac
    seeds = torch.arange(B, device=DEV)
    n = torch.full((B,), 8, device=DEV)
    kw = dict(
        uncond_logits=unc,
        cfg_scale=cfg,
        temperature=T,
        top_k=top_k,
        top_p=top_p,
        confidence=conf,
        n_commit=n,
    )
    it = iter(range(10**9))

    def setup():
        return (pool[next(it) % 2], torch.zeros(B, L, dtype=torch.int64, device=DEV))

    row_bytes = V * pool[0].element_size() * (2 if cfg else 1)
    nbytes = int(cand.sum()) * row_bytes
    res = {"B": B, "L": L, "V": V, "rows": int(cand.sum()), "bytes": nbytes}
    kern = cuda_time(lambda x, t: K.unmask_step(x, t, cand, seeds, 1, backend=KERNEL, **kw), setup, reps=10)
    res["kernel"] = kern
    res["kernel_GBps"] = round(nbytes / (kern["median_ms"] * 1e-3) / 1e9, 1)
    res["fraction_of_copy_bw"] = round(res["kernel_GBps"] / copy_gbs, 3)
    x, t1 = setup()
    t2 = t1.clone()
    a = K.unmask_step(x, t1, cand, seeds, 1, backend=KERNEL, **kw)
    ref = None
    try:
        ref = R.unmask_step_reference(x, t2, cand, seeds, 1, **kw)
        res["identical_to_reference"] = all(torch.equal(p, q) for p, q in zip(a, ref))
        eager = cuda_time(
            lambda x, t: R.unmask_step_reference(x, t, cand, seeds, 1, **kw), setup, reps=3, warmup=1
        )
        res["eager"] = eager
        res["speedup_vs_eager"] = round(eager["median_ms"] / kern["median_ms"], 1)
    except torch.OutOfMemoryError as e:
        res["eager"] = f"skipped: out of memory ({e})"[:200]
    empty_cache()
    # torch.compile'd reference of the row part (the commit part is tiny) vs the kernel's row part
    if name != "gumbel T=1 bf16":  # one compiled baseline (compiling takes a minute or more per shape)
        res["compiled_reference"] = "skipped: measured on the 'gumbel T=1 bf16' config only"
    elif SMOKE:
        res["compiled_reference"] = "skipped: smoke run"
    elif left() > 200:
        try:
            rows = x.reshape(B * L, V)[cand.reshape(-1)].contiguous()
            pos = torch.arange(rows.shape[0], device=DEV) % L
            sd = torch.arange(rows.shape[0], device=DEV) // L
            ck = dict(
                seeds=sd, positions=pos, step=1, temperature=T, top_k=top_k, top_p=top_p, confidence=conf
            )
            comp = torch.compile(R.choose_tokens_reference, dynamic=False)
            t = time.perf_counter()
            comp(rows, **ck)
            res["compile_seconds"] = round(time.perf_counter() - t, 1)
            cres = cuda_time(lambda: comp(rows, **ck), reps=5, warmup=1)
            kres = cuda_time(lambda: K.choose_tokens(rows, backend=KERNEL, **ck), reps=10)
            res["compiled_reference"] = cres
            res["kernel_rows_only"] = kres
            res["speedup_vs_compiled"] = round(cres["median_ms"] / kres["median_ms"], 2)
            tk, _ = K.choose_tokens(rows, backend=KERNEL, **ck)
            tc, _ = comp(rows, **ck)
            res["compiled_token_agreement"] = round(float((tk == tc).float().mean()), 6)
        except Exception as e:  # compile failures are reported, not fatal
            res["compiled_reference"] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
    log(f"sampler {name}: {res.get('kernel_GBps')} GB/s, x{res.get('speedup_vs_eager')} vs eager")
    return res


# ------------------------------------------------------------------------------------------------------------
def section_attention() -> dict:
    out = {}
    shapes = [
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
    if SMOKE:  # the same cases, tiny
        shapes = [("L64 D64", 1, 2, 64, 64, 64, 0), ("L64 D128 3 docs", 1, 2, 64, 64, 128, 3),
                  ("prefix cache q16 k80", 2, 2, 16, 80, 64, 0)]
    for name, *shape in shapes:
        if left() < 60:
            out[name] = "skipped: time budget"
            continue
        out[name] = _bench_attention(name, *shape)
        empty_cache()
    return out


def _bench_attention(name, B, H, Lq, Lk, D, docs) -> dict:
    from smdm import kernels as K
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qs = ks = None
    if docs:
        ks = (torch.arange(Lk, device=DEV) * docs // Lk).to(torch.int32).expand(B, Lk).contiguous()
        qs = ks[:, Lk - Lq :].contiguous()

    def setup():
        q = torch.randn(B, H, Lq, D, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(B, H, Lk, D, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(B, H, Lk, D, device=DEV, dtype=torch.bfloat16)
        return q, k, v

    flops = 4 * B * H * Lq * Lk * D  # dense count (document masking does less useful work)
    res = {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "documents": docs, "flops": flops}
    kern = cuda_time(
        lambda q, k, v: K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend=KERNEL),
        setup,
        reps=10,
    )
    res["kernel"] = kern
    res["kernel_TFLOPs"] = round(flops / (kern["median_ms"] * 1e-3) / 1e12, 1)
    if not docs:
        for bname, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    r = cuda_time(lambda q, k, v: sdpa(q, k, v), setup, reps=10)
                res[bname] = r
                res[f"{bname}_TFLOPs"] = round(flops / (r["median_ms"] * 1e-3) / 1e12, 1)
                res[f"ratio_vs_{bname}"] = round(r["median_ms"] / kern["median_ms"], 3)
            except Exception as e:
                res[bname] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    else:  # baseline with a boolean document mask (SDPA efficient backend)
        mask = qs[:, None, :, None] == ks[:, None, None, :]
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                r = cuda_time(lambda q, k, v: sdpa(q, k, v, attn_mask=mask), setup, reps=10)
            res["sdpa_efficient_masked"] = r
            res["ratio_vs_sdpa_efficient_masked"] = round(r["median_ms"] / kern["median_ms"], 3)
        except Exception as e:
            res["sdpa_efficient_masked"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    q, k, v = setup()
    ref = K.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, out_dtype=torch.float32)
    res["max_abs_err_vs_fp32"] = float(
        (K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend=KERNEL).float() - ref).abs().max()
    )
    # the flash-attention test criterion: the kernel's error vs fp32 at most 2x plain PyTorch's in bf16
    mask = None if qs is None else qs[:, None, :, None] == ks[:, None, None, :]
    res["max_abs_err_sdpa_math_bf16"] = float((_sdpa_math(q, k, v, mask).float() - ref).abs().max())
    res["err_ratio_vs_sdpa_math"] = round(res["max_abs_err_vs_fp32"] / max(res["max_abs_err_sdpa_math_bf16"], 1e-12), 2)
    log(
        f"attention {name}: {res['kernel_TFLOPs']} TFLOP/s, flash x{res.get('ratio_vs_flash')}, "
        f"cudnn x{res.get('ratio_vs_cudnn')}"
    )
    return res


def _sdpa_math(q, k, v, mask):
    """Plain PyTorch attention in the inputs' precision (SDPA's math backend): the error yardstick."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ------------------------------------------------------------------------------------------------------------
def section_model(peak_tflops: float) -> dict:
    """Generation (MDM vs its ARM twin, generated tokens only) and training throughput / MFU of the 1028M
    model through smdm's own code paths (the tiny config in smoke mode)."""
    from smdm import model as M

    name, V = pick(("1028M", 32000), ("tiny", 512))
    out: dict = {"config": name, "vocab_size": V}
    if left() < 120:
        return {"status": "skipped: time budget"}
    try:
        out.update(_bench_generate(M, name, V))
    except Exception as e:
        out["generate"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        log(traceback.format_exc()[-2000:])
    empty_cache()
    try:
        out["train"] = _bench_train(M, name, V, peak_tflops)
    except Exception as e:
        out["train"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        log(traceback.format_exc()[-2000:])
    empty_cache()
    return out


def _bench_generate(M, name: str, V: int) -> dict:
    """Generated tokens per second (prompt tokens not counted) of MDM samplers vs the ARM with its static KV
    cache, batch 8, same prompt and length; each timed once after a short warm-up generation."""
    from smdm import sampling as S

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    batch, prompt_len, gen = 8, pick(64, 8), pick(256, 32)
    prompts = [[1] + [100 + (7 * i + j) % (V - 200) for j in range(prompt_len - 1)] for i in range(batch)]
    mdm = M.build_model(M.config_by_name(name, vocab_size=V, causal=False), seed=0, device=DEV).to(dtype).eval()
    arm = M.build_model(M.config_by_name(name, vocab_size=V, causal=True), seed=0, device=DEV).to(dtype).eval()
    runs = [
        # label, model, kwargs, environment (SMDM_KERNELS)
        ("arm kv-cache", arm, {}, "auto"),
        ("mdm steps=gen/4", mdm, dict(steps=gen // 4, block_length=gen), "auto"),
        ("mdm steps=gen/4 SMDM_KERNELS=reference", mdm, dict(steps=gen // 4, block_length=gen),
         "reference"),  # SDPA and the PyTorch sampler: what the fused kernels gain
        ("mdm blocks 32 prefix-cache steps=gen/4", mdm, dict(steps=gen // 4, block_length=32, cache="prefix"),
         "auto"),
        ("mdm steps=gen", mdm, dict(steps=gen, block_length=gen), "auto"),
    ]
    res: dict = {"batch": batch, "prompt_len": prompt_len, "gen_length": gen, "dtype": str(dtype)}
    old = os.environ.get("SMDM_KERNELS")
    try:
        for label, net, kw, env in runs:
            if left() < 90:
                res[label] = "skipped: time budget"
                continue
            os.environ["SMDM_KERNELS"] = env
            with torch.no_grad():
                S.generate(net, prompts[:2], gen_length=gen, seed=0, batch_invariant=False, **kw)  # warm-up
                sync()
                t = time.perf_counter()
                o = S.generate(net, prompts, gen_length=gen, seed=0, batch_invariant=False, **kw)
                sync()
                dt = time.perf_counter() - t
            res[label] = {"seconds": round(dt, 3), "tokens_per_s": round(batch * gen / dt, 1),
                          "forward_passes": o.forward_passes, **kw}
            log(f"generate {label}: {res[label]['tokens_per_s']} tok/s")
    finally:
        if old is None:
            os.environ.pop("SMDM_KERNELS", None)
        else:
            os.environ["SMDM_KERNELS"] = old
    arm_tps = res["arm kv-cache"]["tokens_per_s"] if isinstance(res.get("arm kv-cache"), dict) else None
    for label, _, _, _ in runs[1:]:
        if arm_tps and isinstance(res.get(label), dict):
            res[label]["over_arm"] = round(res[label]["tokens_per_s"] / arm_tps, 2)
    return {"generate": res}


def _bench_train(M, name: str, V: int, peak_tflops: float) -> dict:
    """Training steps of the MDM objective as `smdm train` runs them (Rust forward process, output head and CE
    at masked rows only, bf16 autocast, fused AdamW), tokens/s and MFU against the measured GEMM peak."""
    from smdm import diffusion

    cfg = M.config_by_name(name, vocab_size=V, causal=False)
    net = M.build_model(cfg, seed=0, device=DEV).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=DEV == "cuda")
    B, L = pick((4, 2048), (2, 64))
    gen = torch.Generator().manual_seed(0)
    it = iter(range(10**9))

    def batch():
        ids = torch.randint(0, V, (B, L), generator=gen)
        fp = diffusion.forward_process(ids, seed=0, step=next(it), mask_id=cfg.mask_id, crop_prob=0.0)
        return (fp.noisy_ids.to(DEV), ids.to(DEV), fp.mask.to(DEV), fp.weight.to(DEV))

    def step(noisy, x0, mask, weight):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            loss = diffusion.mdm_loss(net, noisy, x0, mask, weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = cuda_time(step, batch, reps=pick(6, 2), warmup=2)
    d, n_layer = cfg.d_model, cfg.n_layer
    n_non_emb = n_layer * (4 * d**2 + 3 * d * cfg.d_ff + 2 * d) + d
    tok_s = B * L / (r["median_ms"] * 1e-3)
    # model FLOPs per token: 6 N (weights, forward + backward) + 12 n_layer L d (bidirectional attention
    # scores and values, forward + backward); the output head (at masked rows only) is not counted
    flops_tok = 6 * n_non_emb + 12 * n_layer * L * d
    res = {"batch": B, "seq_len": L, "step": r, "tokens_per_s": round(tok_s),
           "mfu_6N": round(6 * n_non_emb * tok_s / (peak_tflops * 1e12), 3),
           "mfu_6N_plus_attention": round(flops_tok * tok_s / (peak_tflops * 1e12), 3),
           "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None}
    log(f"train {name}: {res['tokens_per_s']} tok/s, MFU {res['mfu_6N_plus_attention']}")
    return res


# ------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=os.environ.get("OUT", "benches/results"), help="directory for gpu_suite.json"
    )
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny shapes (checks this script)")
    args = ap.parse_args()
    global SMOKE, DEV, KERNEL
    if args.smoke:
        SMOKE, DEV, KERNEL = True, "cpu", "reference"
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --smoke for a CPU dry run of the script)", file=sys.stderr)
        return 2
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": SMOKE}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():  # after every section, atomically: a run cut off by its time limit keeps what it measured
        tmp = out_dir / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, out_dir / "gpu_suite.json")

    def run(name, fn, *a):
        log(f"--- {name}")
        try:
            results[name] = fn(*a)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"{name} failed: {e}")
        results["seconds"] = round(time.perf_counter() - T0, 1)
        save()
        return results[name]

    run("env", section_env)
    build = run("build", section_build)
    if "error" in build:
        print(build["traceback"], flush=True)
    if not args.skip_tests:
        run("tests", section_tests)
    ceil = run("ceilings", section_ceilings)
    # the ratios' denominators; a failed ceilings section falls back to DESIGN §8's H100 figures
    copy_gbs = ceil.get("copy_GBps") if isinstance(ceil, dict) else None
    peak = ceil.get("bf16_gemm_TFLOPs") if isinstance(ceil, dict) else None
    copy_gbs = copy_gbs if copy_gbs and copy_gbs > 0 else 3000.0
    peak = peak if peak and peak > 0 else 800.0
    if "error" not in build:
        run("sampler", section_sampler, copy_gbs)
        run("attention", section_attention)
    if not args.skip_model:
        run("model", section_model, peak)
    results["seconds"] = round(time.perf_counter() - T0, 1)
    save()
    print_table(results)
    print(f"full results: {out_dir / 'gpu_suite.json'}")
    return 0


def print_table(r: dict) -> None:
    env = r.get("env", {})
    print(
        f"\n== smdm GPU suite: {env.get('gpu')} | torch {env.get('torch')} | CUDA {env.get('cuda')} "
        f"| {r.get('seconds')} s =="
    )
    t = r.get("tests", {})
    if isinstance(t, dict) and "summary" in t:
        print(f"tests (pytest -m gpu): {t['summary']}")
    c = r.get("ceilings", {})
    if isinstance(c, dict) and "copy_GBps" in c:
        print(f"ceilings: copy {c['copy_GBps']} GB/s, bf16 GEMM {c['bf16_gemm_TFLOPs']} TFLOP/s")
    print(
        f"{'sampler':28s} {'kernel ms':>10s} {'GB/s':>8s} {'x copy':>7s} {'x eager':>8s} "
        f"{'x compiled':>10s} exact"
    )
    for name, s in (r.get("sampler") or {}).items():
        if isinstance(s, dict) and "kernel" in s:
            print(
                f"{name:28s} {s['kernel']['median_ms']:10.3f} {s['kernel_GBps']:8.0f} "
                f"{s['fraction_of_copy_bw']:7.2f} "
                f"{s.get('speedup_vs_eager', '-')!s:>8s} {s.get('speedup_vs_compiled', '-')!s:>10s} "
                f"{s.get('identical_to_reference')}"
            )
        else:
            print(f"{name:28s} {s}")
    print(
        f"{'attention (bf16)':28s} {'kernel ms':>10s} {'TFLOP/s':>8s} {'x flash':>8s} {'x cudnn':>8s} "
        f"{'max err':>9s} {'err/sdpa':>8s}"
    )
    for name, s in (r.get("attention") or {}).items():
        if isinstance(s, dict) and "kernel" in s:
            print(
                f"{name:28s} {s['kernel']['median_ms']:10.3f} {s['kernel_TFLOPs']:8.1f} "
                f"{s.get('ratio_vs_flash', s.get('ratio_vs_sdpa_efficient_masked', '-'))!s:>8s} "
                f"{s.get('ratio_vs_cudnn', '-')!s:>8s} {s['max_abs_err_vs_fp32']:9.2e} "
                f"{s['err_ratio_vs_sdpa_math']:8.2f}"
            )
        else:
            print(f"{name:28s} {s}")
    m = r.get("model")
    if isinstance(m, dict):
        g = m.get("generate")
        if isinstance(g, dict):
            print(f"generation {m.get('config')} batch {g.get('batch')}, {g.get('gen_length')} new tokens "
                  f"({g.get('dtype')}):")
            for k, v in g.items():
                if isinstance(v, dict):
                    print(f"  {k:42s} {v['tokens_per_s']:10.1f} tok/s  x ARM {v.get('over_arm', '-')}")
                elif isinstance(v, str) and v.startswith("skipped"):
                    print(f"  {k:42s} {v}")
        elif g is not None:
            print(f"generation: {g}")
        t = m.get("train")
        if isinstance(t, dict):
            print(f"training {m.get('config')} {t['batch']}x{t['seq_len']}: {t['tokens_per_s']} tok/s, "
                  f"MFU {t['mfu_6N']} (6N) / {t['mfu_6N_plus_attention']} (6N + attention), "
                  f"peak {t['peak_memory_GiB']} GiB")
        elif t is not None:
            print(f"training: {t}")
        if "status" in m:
            print(f"model: {m['status']}")
    if r.get("smoke"):
        print("(smoke run on CPU: the script's code paths only; every number above is meaningless)")


if __name__ == "__main__":
    sys.exit(main())
