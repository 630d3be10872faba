# python benches/gpu_suite.py [--out DIR] [--skip-tests] [--skip-model]     (one H100: < 8 min)
"""smdm GPU suite: builds the kernels, runs `pytest -m gpu`, measures the physical ceilings (copy bandwidth,
bf16 GEMM), then benchmarks with CUDA events (warm-up, medians, fresh random inputs per repetition):

  sampler    fused unmask_step / choose_tokens kernel vs the eager PyTorch reference and the torch.compile'd
             reference; bytes of logits read per second as a fraction of copy bandwidth (target >= 0.7) and
             the speed-up over eager (target >= 5x)
  attention  the flash kernel vs SDPA's flash and cuDNN backends, bf16, TFLOP/s (targets >= 1.0x flash,
             >= 0.9x cuDNN at L >= 1k); plus document-masked and prefix-cache shapes
  model      MDM vs ARM generation and training MFU of the 1028M model, if smdm.model / smdm.sampling exist

Writes the full results as JSON to $OUT/gpu_suite.json (or --out DIR) and prints a short table last.
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


def left() -> float:
    return BUDGET_S - (time.perf_counter() - T0)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def cuda_time(fn, setup=None, reps: int = 10, warmup: int = 2) -> dict:
    """Median / min milliseconds of fn() with CUDA events; `setup()` (untimed) refreshes inputs each rep."""
    for _ in range(warmup):
        args = setup() if setup else ()
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        args = setup() if setup else ()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


# ------------------------------------------------------------------------------------------------------------
def section_env() -> dict:
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
    cmd += ["-W", "ignore::pytest.PytestConfigWarning", "tests/test_kernels.py"]
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
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    src.uniform_()
    r = cuda_time(dst.copy_, lambda: (src,), reps=20, warmup=3)
    copy_gbs = 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9  # read + write
    src = dst = None
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    g = cuda_time(lambda: a @ b, reps=20, warmup=3)
    tflops = 2 * m**3 / (g["median_ms"] * 1e-3) / 1e12
    return {"copy_GBps": round(copy_gbs, 1), "bf16_gemm_TFLOPs": round(tflops, 1), "gemm_n": m}


# ------------------------------------------------------------------------------------------------------------
def section_sampler(copy_gbs: float) -> dict:
    out = {}
    V = 32000
    configs = [
        # name, B, L, candidate fraction, dtype, cfg, T, top_k, top_p, confidence
        ("greedy bf16", 32, 256, 1.0, torch.bfloat16, 0.0, 0.0, 0, 1.0, "prob"),
        ("gumbel T=1 bf16", 32, 256, 1.0, torch.bfloat16, 0.0, 1.0, 0, 1.0, "prob"),
        ("cfg+top-p 0.9 bf16", 16, 256, 1.0, torch.bfloat16, 1.0, 1.0, 0, 0.9, "margin"),
        ("gumbel T=1 fp32", 16, 256, 1.0, torch.float32, 0.0, 1.0, 0, 1.0, "prob"),
    ]
    for name, *cfg in configs:
        if left() < 150:
            out[name] = "skipped: time budget"
            continue
        out[name] = _bench_sampler(name, *cfg, V=V, copy_gbs=copy_gbs)
        torch.cuda.empty_cache()
    return out


def _bench_sampler(name, B, L, frac, dtype, cfg, T, top_k, top_p, conf, *, V, copy_gbs) -> dict:
    from smdm import kernels as K
    from smdm.kernels import _reference as R

    pool = [
        (torch.randn(B, L, V, device="cuda") * 3).to(dtype),
        (torch.randn(B, L, V, device="cuda") * 3).to(dtype),
    ]
    unc = (torch.randn(B, L, V, device="cuda") * 3).to(dtype) if cfg else None
    cand = torch.rand(B, L, device="cuda") < frac
    seeds = torch.arange(B, device="cuda")
    n = torch.full((B,), 8, device="cuda")
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
        return (pool[next(it) % 2], torch.zeros(B, L, dtype=torch.int64, device="cuda"))

    row_bytes = V * pool[0].element_size() * (2 if cfg else 1)
    nbytes = int(cand.sum()) * row_bytes
    res = {"B": B, "L": L, "V": V, "rows": int(cand.sum()), "bytes": nbytes}
    kern = cuda_time(lambda x, t: K.unmask_step(x, t, cand, seeds, 1, backend="cuda", **kw), setup, reps=10)
    res["kernel"] = kern
    res["kernel_GBps"] = round(nbytes / (kern["median_ms"] * 1e-3) / 1e9, 1)
    res["fraction_of_copy_bw"] = round(res["kernel_GBps"] / copy_gbs, 3)
    x, t1 = setup()
    t2 = t1.clone()
    a = K.unmask_step(x, t1, cand, seeds, 1, backend="cuda", **kw)
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
    torch.cuda.empty_cache()
    # torch.compile'd reference of the row part (the commit part is tiny) vs the kernel's row part
    if name != "gumbel T=1 bf16":  # one compiled baseline (compiling takes a minute or more per shape)
        res["compiled_reference"] = "skipped: measured on the 'gumbel T=1 bf16' config only"
    elif left() > 200:
        try:
            rows = x.reshape(B * L, V)[cand.reshape(-1)].contiguous()
            pos = torch.arange(rows.shape[0], device="cuda") % L
            sd = torch.arange(rows.shape[0], device="cuda") // L
            ck = dict(
                seeds=sd, positions=pos, step=1, temperature=T, top_k=top_k, top_p=top_p, confidence=conf
            )
            comp = torch.compile(R.choose_tokens_reference, dynamic=False)
            t = time.perf_counter()
            comp(rows, **ck)
            res["compile_seconds"] = round(time.perf_counter() - t, 1)
            cres = cuda_time(lambda: comp(rows, **ck), reps=5, warmup=1)
            kres = cuda_time(lambda: K.choose_tokens(rows, backend="cuda", **ck), reps=10)
            res["compiled_reference"] = cres
            res["kernel_rows_only"] = kres
            res["speedup_vs_compiled"] = round(cres["median_ms"] / kres["median_ms"], 2)
            tk, _ = K.choose_tokens(rows, backend="cuda", **ck)
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
    ]
    for name, *shape in shapes:
        if left() < 60:
            out[name] = "skipped: time budget"
            continue
        out[name] = _bench_attention(name, *shape)
        torch.cuda.empty_cache()
    return out


def _bench_attention(name, B, H, Lq, Lk, D, docs) -> dict:
    from smdm import kernels as K
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qs = ks = None
    if docs:
        ks = (torch.arange(Lk, device="cuda") * docs // Lk).to(torch.int32).expand(B, Lk).contiguous()
        qs = ks[:, Lk - Lq :].contiguous()

    def setup():
        q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, Lk, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, H, Lk, D, device="cuda", dtype=torch.bfloat16)
        return q, k, v

    flops = 4 * B * H * Lq * Lk * D  # dense count (document masking does less useful work)
    res = {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "documents": docs, "flops": flops}
    kern = cuda_time(
        lambda q, k, v: K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend="cuda"),
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
        (K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend="cuda").float() - ref).abs().max()
    )
    log(
        f"attention {name}: {res['kernel_TFLOPs']} TFLOP/s, flash x{res.get('ratio_vs_flash')}, "
        f"cudnn x{res.get('ratio_vs_cudnn')}"
    )
    return res


# ------------------------------------------------------------------------------------------------------------
def section_model(peak_tflops: float) -> dict:
    """Generation (MDM vs ARM twin) and training MFU of the 1028M model, through the other teams' code."""
    try:
        from smdm import model as M
        from smdm import sampling as S
    except ImportError as e:
        return {"status": f"skipped: not available ({e})"}
    out = {}
    try:
        if left() < 120:
            return {"status": "skipped: time budget"}
        cfg = M.config_by_name("1028M", vocab_size=32000, causal=False)
        mdm = M.Transformer(cfg).to("cuda", torch.bfloat16).eval()
        prompts = [[1] + list(range(100, 100 + 63))] * 8
        gen, steps = 256, 64
        torch.cuda.synchronize()
        t = time.perf_counter()
        S.generate(mdm, prompts, gen_length=gen, steps=steps, block_length=gen, seed=0, batch_invariant=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out["mdm_generate"] = {
            "batch": 8,
            "gen_length": gen,
            "steps": steps,
            "seconds": round(dt, 2),
            "tokens_per_s": round(8 * gen / dt, 1),
        }
        torch.cuda.empty_cache()
        arm_cfg = M.config_by_name("1028M", vocab_size=32000, causal=True)
        arm = M.Transformer(arm_cfg).to("cuda", torch.bfloat16).eval()
        torch.cuda.synchronize()
        t = time.perf_counter()
        S.generate(arm, prompts, gen_length=gen, seed=0, batch_invariant=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out["arm_generate"] = {
            "batch": 8,
            "gen_length": gen,
            "seconds": round(dt, 2),
            "tokens_per_s": round(8 * gen / dt, 1),
        }
        out["mdm_over_arm"] = round(
            out["mdm_generate"]["tokens_per_s"] / out["arm_generate"]["tokens_per_s"], 2
        )
        torch.cuda.empty_cache()
    except Exception as e:
        out["generate"] = f"skipped: {type(e).__name__}: {str(e)[:300]}"
    try:
        if left() < 90:
            out["train"] = "skipped: time budget"
            return out
        cfg = M.config_by_name("1028M", vocab_size=32000, causal=False)
        net = M.Transformer(cfg).to("cuda")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        B, L = 4, 2048
        x = torch.randint(0, 32000, (B, L), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1).float(), x.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = cuda_time(step, reps=5, warmup=2)
        n_non_emb = (
            cfg.n_layer * (4 * cfg.d_model**2 + 3 * cfg.d_model * cfg.d_ff + 2 * cfg.d_model) + cfg.d_model
        )
        tok_s = B * L / (r["median_ms"] * 1e-3)
        mfu = 6 * n_non_emb * tok_s / (peak_tflops * 1e12)
        out["train"] = {
            "batch": B,
            "seq_len": L,
            "step_ms": round(r["median_ms"], 1),
            "tokens_per_s": round(tok_s),
            "mfu_vs_measured_gemm_peak": round(mfu, 3),
            "note": "plain eager step, full-vocab head",
        }
        torch.cuda.empty_cache()
    except Exception as e:
        out["train"] = f"skipped: {type(e).__name__}: {str(e)[:300]}"
    return out


# ------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=os.environ.get("OUT", "benches/results"), help="directory for gpu_suite.json"
    )
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def run(name, fn, *a):
        log(f"--- {name}")
        try:
            results[name] = fn(*a)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"{name} failed: {e}")
        return results[name]

    run("env", section_env)
    build = run("build", section_build)
    if "error" in build:
        print(build["traceback"], flush=True)
    if not args.skip_tests:
        run("tests", section_tests)
    ceil = run("ceilings", section_ceilings)
    copy_gbs = ceil.get("copy_GBps", 3000.0) if isinstance(ceil, dict) else 3000.0
    peak = ceil.get("bf16_gemm_TFLOPs", 800.0) if isinstance(ceil, dict) else 800.0
    if "error" not in build:
        run("sampler", section_sampler, copy_gbs)
        run("attention", section_attention)
    if not args.skip_model:
        run("model", section_model, peak)
    results["seconds"] = round(time.perf_counter() - T0, 1)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_suite.json").write_text(json.dumps(results, indent=2, default=str))
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
        f"{'max err':>9s}"
    )
    for name, s in (r.get("attention") or {}).items():
        if isinstance(s, dict) and "kernel" in s:
            print(
                f"{name:28s} {s['kernel']['median_ms']:10.3f} {s['kernel_TFLOPs']:8.1f} "
                f"{s.get('ratio_vs_flash', s.get('ratio_vs_sdpa_efficient_masked', '-'))!s:>8s} "
                f"{s.get('ratio_vs_cudnn', '-')!s:>8s} {s['max_abs_err_vs_fp32']:9.2e}"
            )
        else:
            print(f"{name:28s} {s}")
    m = r.get("model")
    if isinstance(m, dict):
        for k, v in m.items():
            print(f"model {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
