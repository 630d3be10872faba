// flash_attention.cuh — fused bidirectional attention forward (FlashAttention-2 style) for smdm.
//
//   out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h',j] | allowed(i, j)) v[b,h',j],  h' = h / (Hq/Hkv)
//   allowed(i, j) = j < Lk and (no segment ids, or q_seg[b,i] == k_seg[b,j])   (document masking)
// Lq may differ from Lk (a block of queries attending to cached prefix K/V plus itself). Rows with no
// allowed key produce zeros. bf16 / fp16 inputs, fp32 accumulation and softmax statistics.
//
// Tiling: a CTA owns BLOCK_M = 16 * NWARPS query rows of one (batch, head); each warp owns 16 rows and keeps
// its Q fragments, its output accumulator and its running max / sum in registers (online softmax). K and V
// tiles of 64 keys stream through shared memory with cp.async (K of the next tile is in flight while the
// current tile's P V runs). Tensor cores through `mma.sync.m16n8k16` (fp32 accumulate), operands from
// shared memory with `ldmatrix` (`.trans` for V); shared tiles use a 16-byte-chunk XOR swizzle so ldmatrix
// is bank-conflict free. Key tiles whose segment range cannot meet the warp's query segments are skipped.
//
// Hopper note: mma.sync runs on H100/H200 at roughly 2/3 of the wgmma peak. The next step there is a
// warp-specialised variant (TMA producer warp + `wgmma.mma_async.m64n64k16` consumer warpgroups with the
// S / P tiles in registers, as FlashAttention-3); the host API and the reference stay the same.
//
// Raw pointers only; compiles with nvcc and NVRTC (no host or half-precision headers).
#pragma once
#include "smdm_common.cuh"

namespace smdm {

constexpr int ATTN_BLOCK_N = 64;

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D (16x8, fp32) += A (16x16) * B (16x8); A row-major, B column-major fragments (PTX ISA layouts).
template <int DT>
__device__ __forceinline__ void mma_16816(float* d, const u32* a, u32 b0, u32 b1) {
  if (DT == DT_BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <int DT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  return DT == DT_BF16 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
}

// element offset of (row, 16-byte chunk) in a swizzled [rows][D] tile of 16-bit values
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy `rows` x D 16-bit values (row stride `stride` elements) into a swizzled tile; rows >= valid are zeros.
template <int D, int ROWS, int NTHREADS>
__device__ __forceinline__ void load_tile_async(u16* tile, const u16* src, i64 stride, int valid) {
  constexpr int CH = D / 8;
  for (int i = threadIdx.x; i < ROWS * CH; i += NTHREADS) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < valid;
    cp_async16(smem_u32(tile + swz<D>(r, c)), ok ? (const void*)(src + r * stride + c * 8) : (const void*)src,
               ok ? 16 : 0);
  }
}

struct AttnParams {
  const void* q;  // (B, Hq, Lq, D) with any strides, last dim contiguous
  const void* k;  // (B, Hkv, Lk, D)
  const void* v;  // (B, Hkv, Lk, D)
  void* out;      // (B, Hq, Lq, D)
  const int* q_seg;  // (B, Lq) int32 or null
  const int* k_seg;  // (B, Lk) int32 or null
  i64 q_sb, q_sh, q_sl;  // element strides of q (batch, head, position)
  i64 k_sb, k_sh, k_sl;
  i64 v_sb, v_sh, v_sl;
  i64 o_sb, o_sh, o_sl;
  i64 qs_sb, ks_sb;  // batch strides of the segment ids (position stride 1)
  int Lq, Lk, Hq, Hkv;
  float scale_log2;  // softmax scale * log2(e)
};

// The kernel body; entry points below. grid = (ceil(Lq / BLOCK_M), Hq, B); block = 32 * NWARPS;
// dynamic shared memory = (BLOCK_M + 2 * 64) * D * 2 bytes + 64 * 4 (key segment ids).
template <int DT, int D, int NWARPS>
__device__ __forceinline__ void flash_attn_fwd_body(const AttnParams& p) {
  constexpr int BM = 16 * NWARPS, BN = ATTN_BLOCK_N, NT = 32 * NWARPS;
  constexpr int DK = D / 16;  // k-steps over the head dim for S = Q K^T
  constexpr int DN = D / 8;   // n-tiles of 8 over the head dim for O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + BM * D;
  u16* sV = sK + BN * D;
  int* sKseg = reinterpret_cast<int*>(sV + BN * D);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int hk = h / (p.Hq / p.Hkv);
  const u16* qg = static_cast<const u16*>(p.q) + b * p.q_sb + h * p.q_sh + (i64)m0 * p.q_sl;
  const u16* kg = static_cast<const u16*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const u16* vg = static_cast<const u16*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const bool has_seg = p.q_seg != nullptr;

  // Q tile, then the first K tile (2 commit groups)
  load_tile_async<D, BM, NT>(sQ, qg, p.q_sl, p.Lq - m0);
  cp_async_commit();
  load_tile_async<D, BN, NT>(sK, kg, p.k_sl, p.Lk);
  if (has_seg && tid < BN) sKseg[tid] = tid < p.Lk ? p.k_seg[b * p.ks_sb + tid] : 0;
  cp_async_commit();

  // segment ids of this thread's two rows (g, g + 8) and the warp's segment range
  const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;
  int seg0 = 0, seg1 = 0, wmin = 0, wmax = 0;
  if (has_seg) {
    const int* qs = p.q_seg + b * p.qs_sb;
    seg0 = r0 < p.Lq ? qs[r0] : 0x7fffffff;  // padding rows: match nothing useful, outputs dropped
    seg1 = r1 < p.Lq ? qs[r1] : 0x7fffffff;
    wmin = min(r0 < p.Lq ? seg0 : 0x7fffffff, r1 < p.Lq ? seg1 : 0x7fffffff);
    wmax = max(r0 < p.Lq ? seg0 : (int)0x80000000, r1 < p.Lq ? seg1 : (int)0x80000000);
    for (int o = 16; o > 0; o >>= 1) {
      wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
      wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
    }
  }

  cp_async_wait<1>();  // Q landed
  __syncthreads();
  u32 qf[DK][4];
  {
    const int row = warp * 16 + (lane & 15);
    for (int kk = 0; kk < DK; ++kk) {
      const int chunk = kk * 2 + (lane >> 4);
      ldmatrix_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], smem_u32(sQ + swz<D>(row, chunk)));
    }
  }

  float acc[DN][4];
  for (int i = 0; i < DN; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float mrow[2] = {SMDM_NEG_INF, SMDM_NEG_INF};  // running max (log2 domain, scaled)
  float lrow[2] = {0.0f, 0.0f};                  // running sum (per thread's partial columns)

  const int ntiles = (p.Lk + BN - 1) / BN;
  for (int n = 0; n < ntiles; ++n) {
    const int k0 = n * BN;
    cp_async_wait<0>();  // K_n (and its segment ids) landed
    __syncthreads();     // ... for every thread; V buffer free
    load_tile_async<D, BN, NT>(sV, vg + (i64)k0 * p.v_sl, p.v_sl, p.Lk - k0);
    cp_async_commit();

    // warp-uniform skip of tiles whose key segments cannot meet this warp's query segments
    bool active = true;
    if (has_seg) {
      const int valid = min(BN, p.Lk - k0);
      int kmin = 0x7fffffff, kmax = (int)0x80000000;
      if (lane < valid) kmin = kmax = sKseg[lane];
      if (lane + 32 < valid) {
        kmin = min(kmin, sKseg[lane + 32]);
        kmax = max(kmax, sKseg[lane + 32]);
      }
      for (int o = 16; o > 0; o >>= 1) {
        kmin = min(kmin, __shfl_xor_sync(0xffffffffu, kmin, o));
        kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
      }
      active = !(kmax < wmin || kmin > wmax);
    }

    float s[BN / 8][4];
    if (active) {
      for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
      // S = Q K^T: ldmatrix.x4 over K gives the B fragments of two 8-key n-tiles for one 16-wide k-step
      for (int kk = 0; kk < DK; ++kk) {
        for (int np = 0; np < BN / 16; ++np) {
          const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = kk * 2 + ((lane >> 3) & 1);
          u32 b0, b1, b2, b3;
          ldmatrix_x4(b0, b1, b2, b3, smem_u32(sK + swz<D>(key, chunk)));
          mma_16816<DT>(s[2 * np], qf[kk], b0, b1);
          mma_16816<DT>(s[2 * np + 1], qf[kk], b2, b3);
        }
      }
      // mask (out of range keys, other documents), scale into the log2 domain
      for (int i = 0; i < BN / 8; ++i) {
        for (int e = 0; e < 4; ++e) {
          const int kc = i * 8 + 2 * t4 + (e & 1);
          bool ok = k0 + kc < p.Lk;
          if (ok && has_seg) ok = sKseg[kc] == ((e < 2) ? seg0 : seg1);
          s[i][e] = ok ? s[i][e] * p.scale_log2 : SMDM_NEG_INF;
        }
      }
    }
    __syncthreads();  // every warp is done reading K_n
    if (n + 1 < ntiles) {
      const int k1 = k0 + BN;
      load_tile_async<D, BN, NT>(sK, kg + (i64)k1 * p.k_sl, p.k_sl, p.Lk - k1);
      if (has_seg && tid < BN) sKseg[tid] = k1 + tid < p.Lk ? p.k_seg[b * p.ks_sb + k1 + tid] : 0;
    }
    cp_async_commit();

    u32 pf[BN / 16][4];  // P as A fragments (two 8-key C tiles make one 16-key A tile)
    if (active) {
      // online softmax; rows g (e = 0, 1) and g + 8 (e = 2, 3); a row lives in the 4 threads of a quad
      float mnew[2] = {mrow[0], mrow[1]};
      for (int i = 0; i < BN / 8; ++i) {
        mnew[0] = fmaxf(mnew[0], fmaxf(s[i][0], s[i][1]));
        mnew[1] = fmaxf(mnew[1], fmaxf(s[i][2], s[i][3]));
      }
      for (int r = 0; r < 2; ++r) {
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffffu, mnew[r], 1));
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffffu, mnew[r], 2));
      }
      float base[2], corr[2];
      for (int r = 0; r < 2; ++r) {
        base[r] = mnew[r] == SMDM_NEG_INF ? 0.0f : mnew[r];  // fully masked so far: exp2(-inf) = 0
        corr[r] = exp2f(mrow[r] - base[r]);
        mrow[r] = mnew[r];
        lrow[r] *= corr[r];
      }
      for (int i = 0; i < DN; ++i) {
        acc[i][0] *= corr[0];
        acc[i][1] *= corr[0];
        acc[i][2] *= corr[1];
        acc[i][3] *= corr[1];
      }
      for (int i = 0; i < BN / 8; ++i) {
        const float p0 = exp2f(s[i][0] - base[0]), p1 = exp2f(s[i][1] - base[0]);
        const float p2 = exp2f(s[i][2] - base[1]), p3 = exp2f(s[i][3] - base[1]);
        lrow[0] += p0 + p1;
        lrow[1] += p2 + p3;
        pf[i >> 1][(i & 1) * 2 + 0] = pack2<DT>(p0, p1);
        pf[i >> 1][(i & 1) * 2 + 1] = pack2<DT>(p2, p3);
      }
    }
    cp_async_wait<1>();  // V_n landed (the K_{n+1} group may still be in flight); barrier outside branches
    __syncthreads();
    if (active) {
      // O += P V: ldmatrix.x4.trans over V gives the B fragments of two 8-wide head-dim n-tiles
      for (int kk = 0; kk < BN / 16; ++kk) {
        for (int dp = 0; dp < D / 16; ++dp) {
          const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int chunk = dp * 2 + (lane >> 4);
          u32 b0, b1, b2, b3;
          ldmatrix_x4_trans(b0, b1, b2, b3, smem_u32(sV + swz<D>(key, chunk)));
          mma_16816<DT>(acc[2 * dp], pf[kk], b0, b1);
          mma_16816<DT>(acc[2 * dp + 1], pf[kk], b2, b3);
        }
      }
    }
  }
  cp_async_wait<0>();

  // finish: full row sums across the quad, normalise, store (rows without any allowed key -> 0)
  for (int r = 0; r < 2; ++r) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
  }
  const float inv0 = lrow[0] > 0.0f ? 1.0f / lrow[0] : 0.0f;
  const float inv1 = lrow[1] > 0.0f ? 1.0f / lrow[1] : 0.0f;
  u16* og = static_cast<u16*>(p.out) + b * p.o_sb + h * p.o_sh;
  for (int i = 0; i < DN; ++i) {
    const int col = i * 8 + 2 * t4;
    if (r0 < p.Lq)
      *reinterpret_cast<u32*>(og + (i64)r0 * p.o_sl + col) = pack2<DT>(acc[i][0] * inv0, acc[i][1] * inv0);
    if (r1 < p.Lq)
      *reinterpret_cast<u32*>(og + (i64)r1 * p.o_sl + col) = pack2<DT>(acc[i][2] * inv1, acc[i][3] * inv1);
  }
}

// Entry point of the torch launcher (parameters by value in one struct).
template <int DT, int D, int NWARPS>
__global__ void __launch_bounds__(32 * NWARPS) flash_attn_fwd_kernel(const AttnParams p) {
  flash_attn_fwd_body<DT, D, NWARPS>(p);
}

// Entry point with flat scalar arguments (the NVRTC / CuPy path, which passes no structs).
template <int DT, int D, int NWARPS>
__global__ void __launch_bounds__(32 * NWARPS)
    flash_attn_fwd_flat(const void* q, const void* k, const void* v, void* out, const int* q_seg, const int* k_seg,
                        i64 q_sb, i64 q_sh, i64 q_sl, i64 k_sb, i64 k_sh, i64 k_sl, i64 v_sb, i64 v_sh, i64 v_sl,
                        i64 o_sb, i64 o_sh, i64 o_sl, i64 qs_sb, i64 ks_sb, int Lq, int Lk, int Hq, int Hkv,
                        float scale_log2) {
  AttnParams p;
  p.q = q, p.k = k, p.v = v, p.out = out, p.q_seg = q_seg, p.k_seg = k_seg;
  p.q_sb = q_sb, p.q_sh = q_sh, p.q_sl = q_sl, p.k_sb = k_sb, p.k_sh = k_sh, p.k_sl = k_sl;
  p.v_sb = v_sb, p.v_sh = v_sh, p.v_sl = v_sl, p.o_sb = o_sb, p.o_sh = o_sh, p.o_sl = o_sl;
  p.qs_sb = qs_sb, p.ks_sb = ks_sb, p.Lq = Lq, p.Lk = Lk, p.Hq = Hq, p.Hkv = Hkv, p.scale_log2 = scale_log2;
  flash_attn_fwd_body<DT, D, NWARPS>(p);
}

}  // namespace smdm
