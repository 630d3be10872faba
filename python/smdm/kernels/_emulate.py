"""Host emulation of the smdm CUDA kernels, so that CPU tests exercise the kernel code itself (no GPU needed).

The kernel headers of csrc/ (smdm_common.cuh, unmask_sampler.cuh, flash_attention.cuh) are compiled as plain
C++20 by the host compiler, with a small shim:

  * one std::thread per CUDA thread of a block; blocks run one after another; `__syncthreads` is a
    std::barrier over the block, warp shuffles go through a per-warp exchange with a barrier of 32;
  * `ldmatrix` (.x4, .trans), `mma.sync.m16n8k16.row.col` (fp32 accumulate) and `cp.async` (16 bytes with
    zero fill) follow the fragment tables of the PTX ISA, written here independently of the kernel; cp.async
    copies land only at the `wait_group` that must wait for them (the latest moment the rules allow);
  * `__fadd_rn` & co. are single IEEE operations (compiled with -ffp-contract=off), so the sampler must agree
    with `smdm.kernels._reference` bit for bit here too; dynamic shared memory is poisoned before each block.

It checks index arithmetic, tails, fragment layouts, the radix select, the block reductions and the order of
float32 operations, a read of a cp.async buffer before its wait, and the 16-byte alignment of every 16-byte
global load, cp.async and ldmatrix row address (`MisalignedAccess`: x86 would not fault, a GPU does). It
cannot reliably see data races (threads really run concurrently, but every emulated barrier is a full fence),
performance, or what the device compiler does differently.

    lib = load()                                        # builds once per source version (a few seconds)
    pred, conf, committed = unmask_step(logits, tokens, candidates, seeds, step, ...)   # = the CUDA op
    committed = select_positions(confidence, candidates, n=None, threshold=None)
    out = attention(q, k, v, q_segment_ids=None, k_segment_ids=None, scale=None)

Raises `EmulatorUnavailable` when no C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from smdm.kernels._build import cache_root, source_dir
from smdm.kernels._reference import CONFIDENCE_MODES


class EmulatorUnavailable(RuntimeError):
    """No host C++ compiler to build the emulator."""


_PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
using std::max;
using std::min;

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __align__(x) alignas(x)
#define __shared__ static

struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 threadIdx;
static Dim3 blockIdx, blockDim;
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
// 16-byte accesses (ld.global.v4, cp.async 16, ldmatrix rows) fault on a GPU ("misaligned address") unless
// their address is a multiple of 16; x86 does not care, so the emulator counts them (emu_misaligned()).
static std::atomic<long long> g_misaligned{0};
inline void emu_check16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15) g_misaligned.fetch_add(1);
}
inline uint4 __ldcs(const uint4* p) {
  emu_check16(p);
  uint4 r;
  memcpy(&r, p, sizeof(r));
  return r;
}
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
inline double __ull2double_rn(unsigned long long x) { return (double)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline unsigned __float2uint_rz(float x) {  // the device's saturating conversion (NaN -> 0)
  if (!(x >= 0.0f)) return 0u;
  if (x >= 4294967296.0f) return 0xffffffffu;
  return (unsigned)x;
}

struct BlockCtx {
  std::barrier<>* bar;
  std::vector<std::barrier<>*> wbar;
  std::vector<std::vector<unsigned long long>> slots;
  std::vector<std::vector<unsigned>> gather;
};
static BlockCtx g_ctx;
static std::vector<unsigned char> g_dyn_buf(256 * 1024 + 64);
// dynamic shared memory starts 16-byte aligned (at least) on a GPU
static unsigned char* g_dyn =
    reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(g_dyn_buf.data()) + 15) & ~uintptr_t(15));
inline void __syncthreads() { g_ctx.bar->arrive_and_wait(); }

template <typename T>
inline T warp_exchange(T v, bool up, int arg) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  g_ctx.slots[warp][lane] = bits;
  g_ctx.wbar[warp]->arrive_and_wait();
  const int src = up ? (lane >= arg ? lane - arg : lane) : (lane ^ arg);
  const unsigned long long got = g_ctx.slots[warp][src];
  g_ctx.wbar[warp]->arrive_and_wait();
  T r;
  memcpy(&r, &got, sizeof(T));
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o) { return warp_exchange(v, false, o); }
template <typename T> inline T __shfl_up_sync(unsigned, T v, int o) { return warp_exchange(v, true, o); }
// every lane's n words (lane-major) to every lane of the warp
inline void gather32(const unsigned* mine, int n, unsigned* all) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = 0; i < n; ++i) g_ctx.gather[warp][lane * n + i] = mine[i];
  g_ctx.wbar[warp]->arrive_and_wait();
  for (int i = 0; i < 32 * n; ++i) all[i] = g_ctx.gather[warp][i];
  g_ctx.wbar[warp]->arrive_and_wait();
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

static void run_block(Dim3 block, int nt, const std::function<void()>& body) {
  std::barrier<> bar(nt);
  std::vector<std::barrier<>*> wb;
  for (int w = 0; w < nt / 32; ++w) wb.push_back(new std::barrier<>(32));
  g_ctx.bar = &bar;
  g_ctx.wbar = wb;
  g_ctx.slots.assign(nt / 32, std::vector<unsigned long long>(32));
  g_ctx.gather.assign(nt / 32, std::vector<unsigned>(32 * 8));
  memset(g_dyn, 0xA5, g_dyn_buf.size() - 16);  // poison: uninitialised shared memory is not zero on a GPU
  blockIdx = block;
  blockDim = {(unsigned)nt, 1, 1};
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t) th.emplace_back([t, &body] { threadIdx = {(unsigned)t, 0, 0}; body(); });
  for (auto& x : th) x.join();
  for (auto* b : wb) delete b;
}
"""

# after `bf16_bits_to_float` (inside namespace smdm): the half conversions without inline PTX
_SHIM_COMMON = r"""
inline float f16_bits_to_float(u16 h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
inline u16 emu_f2bf(float f) {  // round to nearest even
  u32 b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return (u16)(b >> 16);
}
inline u16 emu_f2h(float f) { _Float16 x = (_Float16)f; u16 h; memcpy(&h, &x, 2); return h; }
inline u32 pack_bf16x2(float lo, float hi) { return (u32)emu_f2bf(lo) | ((u32)emu_f2bf(hi) << 16); }
inline u32 pack_f16x2(float lo, float hi) { return (u32)emu_f2h(lo) | ((u32)emu_f2h(hi) << 16); }
"""

# after `ATTN_BLOCK_N` (inside namespace smdm): PTX semantics of the attention kernel's inline assembly
_SHIM_FLASH = r"""
inline u32 smem_u32(const void* p) { return (u32)((const unsigned char*)p - g_dyn); }
// cp.async lands as late as the PTX rules allow: a thread's copies are queued per commit group and done by
// `cp.async.wait_group N` for all but its N newest groups (a read before the right wait sees stale data).
struct EmuCopy { u32 dst; const void* src; int bytes; };
static thread_local std::vector<std::vector<EmuCopy>> emu_groups;
static thread_local std::vector<EmuCopy> emu_open;
inline void cp_async16(u32 dst, const void* src, int src_bytes) {
  emu_check16(g_dyn + dst);
  emu_check16(src);  // also for a zero fill (src_bytes = 0): PTX asks for an aligned source either way
  emu_open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  emu_groups.push_back(emu_open);
  emu_open.clear();
}
template <int N> inline void cp_async_wait() {
  while ((int)emu_groups.size() > N) {
    for (const EmuCopy& c : emu_groups.front()) {
      memset(g_dyn + c.dst, 0, 16);
      if (c.bytes) memcpy(g_dyn + c.dst, c.src, c.bytes);
    }
    emu_groups.erase(emu_groups.begin());
  }
}
// ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8 (16 bytes); lane l receives in r[i], of
// matrix i, the elements (row l / 4, cols 2 (l % 4) and + 1), or with .trans (rows 2 (l % 4) and + 1,
// col l / 4); the first element in the low half.
inline void emu_ldsm(u32* r, u32 addr, bool trans) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  emu_check16(g_dyn + addr);
  u32 addrs[32];
  gather32(&addr, 1, addrs);
  for (int i = 0; i < 4; ++i) {
    u16 e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * t + h : g, col = trans ? g : 2 * t + h;
      memcpy(&e[h], g_dyn + addrs[8 * i + row] + 2 * col, 2);
    }
    r[i] = (u32)e[0] | ((u32)e[1] << 16);
  }
}
inline void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  u32 r[4];
  emu_ldsm(r, addr, false);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  u32 r[4];
  emu_ldsm(r, addr, true);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
template <int DT> inline float emu_half(u16 h) { return DT == DT_BF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h); }
// mma.m16n8k16.row.col, g = lane / 4, t = lane % 4 (pairs: low half first):
// A: a0 (row g, k 2t..2t+1), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
// B: b0 (k 2t..2t+1, col g), b1 (k 2t + 8.., col g); C/D: c0, c1 (row g, cols 2t, 2t + 1), c2, c3 (row g + 8).
template <int DT>
inline void mma_16816(float* d, const u32* a, u32 b0, u32 b1) {
  float A[16][16], B[16][8];
  u32 mine[6] = {a[0], a[1], a[2], a[3], b0, b1}, all[32 * 6];
  gather32(mine, 6, all);
  for (int l = 0; l < 32; ++l) {
    const u32* f = all + 6 * l;
    const int g = l >> 2, t = l & 3;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = emu_half<DT>((u16)(f[0] >> (16 * h)));
      A[g + 8][2 * t + h] = emu_half<DT>((u16)(f[1] >> (16 * h)));
      A[g][2 * t + 8 + h] = emu_half<DT>((u16)(f[2] >> (16 * h)));
      A[g + 8][2 * t + 8 + h] = emu_half<DT>((u16)(f[3] >> (16 * h)));
      B[2 * t + h][g] = emu_half<DT>((u16)(f[4] >> (16 * h)));
      B[2 * t + 8 + h][g] = emu_half<DT>((u16)(f[5] >> (16 * h)));
    }
  }
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double s = d[e];
    for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
    d[e] = (float)s;
  }
}
"""

_ENTRY = r"""
extern "C" {
long long emu_misaligned() { return g_misaligned.exchange(0); }
void emu_rows(int nt, int dt, int has_unc, const void* cond, const void* unc, const unsigned char* cand,
              const long long* seeds, int seed_div, long long pos_offset, long long step, int L, int V, float scale1,
              float T, int top_k, double top_p, int conf_mode, long long* pred, float* conf, long long rows) {
  for (long long r = 0; r < rows; ++r) {
    run_block({(unsigned)r, 0, 0}, nt, [&] {
#define SMDM_EMU_ROWS(D, U)                                                                                  \
  smdm::unmask_rows_kernel<D, U>(cond, unc, cand, seeds, seed_div, nullptr, pos_offset, nullptr, step, L, V, \
                                 scale1, T, top_k, top_p, conf_mode, pred, conf)
      if (dt == 0) { if (has_unc) SMDM_EMU_ROWS(0, true); else SMDM_EMU_ROWS(0, false); }
      else if (dt == 1) { if (has_unc) SMDM_EMU_ROWS(1, true); else SMDM_EMU_ROWS(1, false); }
      else { if (has_unc) SMDM_EMU_ROWS(2, true); else SMDM_EMU_ROWS(2, false); }
    });
  }
}
void emu_commit(int nt, const long long* pred, const float* conf, const unsigned char* cand,
                const long long* n_commit, float tau, int mode, int L, long long* tokens, long long stride,
                unsigned char* committed, long long B) {
  for (long long b = 0; b < B; ++b)
    run_block({(unsigned)b, 0, 0}, nt, [&] {
      smdm::unmask_commit_kernel(pred, conf, cand, n_commit, tau, mode, L, tokens, stride, committed);
    });
}
void emu_attn(int dt, int D, const void* q, const void* k, const void* v, void* out, const int* qs, const int* ks,
              const long long* st, int Lq, int Lk, int Hq, int Hkv, int B, float scale_log2) {
  constexpr int NW = 4;
  for (int z = 0; z < B; ++z)
    for (int y = 0; y < Hq; ++y)
      for (int x = 0; x < (Lq + 16 * NW - 1) / (16 * NW); ++x)
        run_block({(unsigned)x, (unsigned)y, (unsigned)z}, 32 * NW, [&] {
#define SMDM_EMU_ATTN(DT, DD)                                                                                 \
  smdm::flash_attn_fwd_flat<DT, DD, NW>(q, k, v, out, qs, ks, st[0], st[1], st[2], st[3], st[4], st[5], st[6], \
                                        st[7], st[8], st[9], st[10], st[11], st[12], st[13], Lq, Lk, Hq, Hkv,  \
                                        scale_log2)
          if (dt == 1) { if (D == 64) SMDM_EMU_ATTN(1, 64); else SMDM_EMU_ATTN(1, 128); }
          else { if (D == 64) SMDM_EMU_ATTN(2, 64); else SMDM_EMU_ATTN(2, 128); }
        });
}
}
"""

_REPLACED = {  # header -> device functions whose inline PTX the shim provides
    "smdm_common.cuh": ("f16_bits_to_float", "pack_bf16x2", "pack_f16x2"),
    "unmask_sampler.cuh": (),
    "flash_attention.cuh": (
        "smem_u32",
        "cp_async16",
        "cp_async_commit",
        "cp_async_wait",
        "ldmatrix_x4",
        "ldmatrix_x4_trans",
        "mma_16816",
    ),
}


def _cut_function(text: str, name: str) -> str:
    """`text` without the definition of device function `name` (and its `template <...>` line)."""
    m = re.search(r"^(template <[^\n]*>\n)?__device__[^\n]*\b" + name + r"\(", text, re.M)
    if m is None:
        raise ValueError(f"emulator: no definition of {name}")
    depth, i = 0, text.index("{", m.end())
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[: m.start()] + text[j + 1 :]
    raise ValueError(f"emulator: unbalanced braces after {name}")


def translation_unit(src: Path | None = None) -> str:
    """The C++ text of the emulator: the kernel headers, their inline PTX replaced by the shim."""
    src = source_dir() if src is None else Path(src)
    parts = [_PRELUDE]
    for name, cut in _REPLACED.items():
        text = (src / name).read_text()
        for fn in cut:
            text = _cut_function(text, fn)
        text = text.replace("#pragma once", "").replace('#include "smdm_common.cuh"', "")
        text = re.sub(
            r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?)\s+(\w+)\[\];",
            r"\1* \2 = reinterpret_cast<\1*>(g_dyn);",
            text,
        )
        if name == "smdm_common.cuh":
            anchor = re.search(r"^__device__[^\n]*bf16_bits_to_float\([^\n]*\n", text, re.M)
            text = text[: anchor.end()] + _SHIM_COMMON + text[anchor.end() :]
        if name == "flash_attention.cuh":
            anchor = "constexpr int ATTN_BLOCK_N = 64;\n"
            text = text.replace(anchor, anchor + _SHIM_FLASH)
        if re.search(r"\basm\b", text):
            raise ValueError(f"emulator: {name} has inline PTX the shim does not cover")
        parts.append(f"// ---- {name} ----\n{text}")
    parts.append(_ENTRY)
    return "\n".join(parts)


_lib = None


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise EmulatorUnavailable("no C++ compiler (set CXX)")


def load() -> ctypes.CDLL:
    """Build (once per source version, into the kernel cache) and load the emulator library."""
    global _lib
    if _lib is not None:
        return _lib
    cxx = _compiler()
    code = translation_unit()
    flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
    digest = hashlib.sha256((code + cxx + " ".join(flags)).encode()).hexdigest()[:16]
    out_dir = cache_root() / "emulator"
    so = out_dir / f"smdm_emu_{digest}.so"
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            cpp = Path(tmp) / "emu.cpp"
            cpp.write_text(code)
            tmp_so = Path(tmp) / "emu.so"
            r = subprocess.run([cxx, *flags, str(cpp), "-o", str(tmp_so)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulator build failed ({cxx}):\n{r.stderr[-4000:]}")
            os.replace(tmp_so, so)
    lib = ctypes.CDLL(str(so))
    P, N, LL, F, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_double
    lib.emu_rows.argtypes = [N, N, N, P, P, P, P, N, LL, LL, N, N, F, F, N, D, N, P, P, LL]
    lib.emu_commit.argtypes = [N, P, P, P, P, F, N, N, P, LL, P, LL]
    lib.emu_attn.argtypes = [N, N, P, P, P, P, P, P, P, N, N, N, N, N, F]
    lib.emu_misaligned.restype = LL
    lib.emu_misaligned()  # a fresh count
    _lib = lib
    return lib


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class MisalignedAccess(RuntimeError):
    """An emulated kernel made a 16-byte access at an address that is not a multiple of 16 (a GPU faults)."""


def _check_aligned(lib, what: str) -> None:
    n = lib.emu_misaligned()
    if n:
        raise MisalignedAccess(f"emulated {what}: {n} 16-byte accesses off 16-byte alignment (a GPU faults)")


_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def unmask_step(
    logits,
    tokens,
    candidates,
    seeds,
    step: int,
    *,
    uncond_logits=None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    confidence: str = "prob",
    n_commit=None,
    threshold: float | None = None,
    position_offset: int = 0,
    threads: int = 64,
):
    """`smdm.kernels.unmask_step` run by the emulated kernels (CPU tensors; `threads` per block, a multiple
    of 32; the real launch uses 1024). Same arguments and outputs."""
    lib = load()
    B, L, V = logits.shape
    assert logits.is_contiguous() and candidates.is_contiguous() and (L <= 1 or tokens.stride(1) == 1)
    pred = torch.full((B, L), -12345, dtype=torch.int64)  # poison: every entry must be written
    conf = torch.full((B, L), 12345.0)
    committed = torch.full((B, L), 7, dtype=torch.uint8)
    seeds = seeds.contiguous()
    unc = None if uncond_logits is None else uncond_logits.contiguous()
    lib.emu_rows(
        threads,
        _DT[logits.dtype],
        unc is not None,
        _p(logits),
        _p(unc),
        _p(candidates),
        _p(seeds),
        L,
        position_offset,
        step,
        L,
        V,
        float(np.float32(cfg_scale + 1.0)),
        float(np.float32(temperature)),
        min(max(int(top_k), 0), V),
        float(top_p),
        CONFIDENCE_MODES[confidence],
        _p(pred),
        _p(conf),
        B * L,
    )
    n = None if n_commit is None else n_commit.contiguous()
    lib.emu_commit(
        threads,
        _p(pred),
        _p(conf),
        _p(candidates),
        _p(n),
        float(np.float32(0.0 if threshold is None else threshold)),
        0 if n is not None else 1,
        L,
        _p(tokens),
        tokens.stride(0),
        _p(committed),
        B,
    )
    _check_aligned(lib, "unmask_step")
    return pred, conf, committed.view(torch.bool)


def select_positions(confidence, candidates, n=None, threshold: float | None = None, threads: int = 64):
    """`smdm.kernels.select_positions` run by the emulated commit kernel (CPU tensors)."""
    lib = load()
    B, P = confidence.shape
    conf = confidence.to(torch.float32).contiguous()
    cand = candidates.contiguous()
    if n is not None:
        n = torch.as_tensor(n, dtype=torch.int64).expand(B).contiguous()
    committed = torch.full((B, P), 7, dtype=torch.uint8)
    lib.emu_commit(
        threads,
        None,
        _p(conf),
        _p(cand),
        _p(n),
        float(np.float32(0.0 if threshold is None else threshold)),
        0 if n is not None else 1,
        P,
        None,
        0,
        _p(committed),
        B,
    )
    _check_aligned(lib, "select_positions")
    return committed.view(torch.bool)


def attention(q, k, v, *, q_segment_ids=None, k_segment_ids=None, scale: float | None = None):
    """`smdm.kernels.attention` run by the emulated kernel (CPU bf16/fp16 tensors, head dim 64 or 128; q/k/v
    with a contiguous last dim and strides that are multiples of 8)."""
    lib = load()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # poison
    qs = None if q_segment_ids is None else q_segment_ids.to(torch.int32).contiguous()
    ks = None if k_segment_ids is None else k_segment_ids.to(torch.int32).contiguous()
    strides = [s for t in (q, k, v, out) for s in t.stride()[:3]]
    strides += [0 if qs is None else qs.stride(0), 0 if ks is None else ks.stride(0)]
    st = torch.tensor(strides, dtype=torch.int64)
    lib.emu_attn(
        _DT[q.dtype],
        D,
        _p(q),
        _p(k),
        _p(v),
        _p(out),
        _p(qs),
        _p(ks),
        _p(st),
        Lq,
        Lk,
        Hq,
        Hkv,
        B,
        float(np.float32(scale * 1.4426950408889634)),
    )
    _check_aligned(lib, "attention")
    return out
