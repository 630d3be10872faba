// smdm_common.cuh — device helpers shared by the smdm kernels.
//
// Rules for every header in csrc/ that defines kernels (checked by `smdm kernels check`):
//   * no torch / ATen / host-only includes, so the same text compiles with nvcc and with NVRTC (CuPy);
//   * raw pointers and plain integer types only; half/bfloat16 are handled as raw 16-bit patterns through
//     inline PTX, so no <cuda_fp16.h> / <cuda_bf16.h> is needed either.
//
// Determinism: the sampler must reproduce `smdm.kernels.unmask_step_reference` bit for bit. Every float
// operation on that path therefore uses the correctly rounded intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn),
// which the compiler never contracts into FMAs, and log/exp are our own short op sequences
// (`log_f32`, `exp_neg_f32`) that the PyTorch reference evaluates op for op. Constants are given as bit
// patterns so both sides use exactly the same float32 values.
#pragma once

namespace smdm {

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

// ---------------------------------------------------------------------------------------------------------
// Counter-based RNG (= python/smdm/rng.py = rust/src/rng.rs)
// ---------------------------------------------------------------------------------------------------------
constexpr u64 STREAM_GUMBEL = 6;

__device__ __forceinline__ u64 splitmix64(u64 x) {
  u64 z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// key(w0, w1, w2, w3): fold h = splitmix64(h ^ w) from h = 0.
__device__ __forceinline__ u64 rng_key4(u64 w0, u64 w1, u64 w2, u64 w3) {
  u64 h = splitmix64(w0);
  h = splitmix64(h ^ w1);
  h = splitmix64(h ^ w2);
  return splitmix64(h ^ w3);
}

// ---------------------------------------------------------------------------------------------------------
// 16-bit float conversions without the CUDA half headers
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float bf16_bits_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_bits_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// Two floats -> packed bf16x2 / f16x2 (round to nearest even); `lo` goes to the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// dtype codes used by every template in csrc/ (and by the launchers / the NVRTC name expressions)
enum DType : int { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

template <int DT>
__device__ __forceinline__ float load_as_float(const void* p, i64 i) {
  if (DT == DT_F32) return static_cast<const float*>(p)[i];
  const u16 b = static_cast<const u16*>(p)[i];
  return DT == DT_BF16 ? bf16_bits_to_float(b) : f16_bits_to_float(b);
}

// 16 bytes of DT values -> floats (4 for float32, 8 for bf16 / fp16; lowest address first).
template <int DT>
__device__ __forceinline__ void unpack16(uint4 r, float* out) {
  const u32 w[4] = {r.x, r.y, r.z, r.w};
  if constexpr (DT == DT_F32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == DT_BF16) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        out[2 * i] = f16_bits_to_float((u16)(w[i] & 0xffffu));
        out[2 * i + 1] = f16_bits_to_float((u16)(w[i] >> 16));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic float32 math (the reference mirrors each line; see python/smdm/kernels/_reference.py)
// ---------------------------------------------------------------------------------------------------------
#define SMDM_F(bits) __int_as_float((int)(bits))
#define SMDM_LN2_HI SMDM_F(0x3f317200)   // 0.693145751953125 (15 significant bits: n * LN2_HI is exact)
#define SMDM_LN2_LO SMDM_F(0x35bfbe8e)   // ln 2 - LN2_HI
#define SMDM_LOG2E SMDM_F(0x3fb8aa3b)
#define SMDM_NEG_INF __int_as_float(0xff800000)
#define SMDM_POS_INF __int_as_float(0x7f800000)

// Natural log of a positive float32: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), odd series to s^9 (|s| <= 0.1716: error < 1e-9).
// log(0) = -inf (either sign of zero). Error vs the true log: a few ulp.
__device__ __forceinline__ float log_f32(float x) {
  if (x == 0.0f) return SMDM_NEG_INF;
  const int bits = __float_as_int(x);
  int e = (bits >> 23) - 127;
  int mb = (bits & 0x7fffff) | 0x3f800000;
  if (mb > 0x3fb504f3) {  // m > sqrt(2): use m / 2
    mb = (bits & 0x7fffff) | 0x3f000000;
    e += 1;
  }
  const float m = __int_as_float(mb);
  const float f = __fsub_rn(m, 1.0f);  // exact (Sterbenz)
  const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
  const float s2 = __fmul_rn(s, s);
  float p = SMDM_F(0x3e638e39);                         // 2/9
  p = __fadd_rn(__fmul_rn(p, s2), SMDM_F(0x3e924925));  // 2/7
  p = __fadd_rn(__fmul_rn(p, s2), SMDM_F(0x3ecccccd));  // 2/5
  p = __fadd_rn(__fmul_rn(p, s2), SMDM_F(0x3f2aaaab));  // 2/3
  p = __fmul_rn(p, s2);
  const float lm = __fadd_rn(__fmul_rn(2.0f, s), __fmul_rn(s, p));
  const float ef = (float)e;
  return __fadd_rn(__fmul_rn(ef, SMDM_LN2_HI), __fadd_rn(__fmul_rn(ef, SMDM_LN2_LO), lm));
}

// exp(z) for z <= 0 (also -inf); exp(z) := 0 below -80 (keeps every result a normal float).
// z = n ln2 + r, |r| <= ln2/2, Taylor series to r^8 (error < 2e-9 relative), times 2^n.
__device__ __forceinline__ float exp_neg_f32(float z) {
  if (!(z >= -80.0f)) return 0.0f;
  const float n = rintf(__fmul_rn(z, SMDM_LOG2E));
  const float r = __fsub_rn(__fsub_rn(z, __fmul_rn(n, SMDM_LN2_HI)), __fmul_rn(n, SMDM_LN2_LO));
  float p = SMDM_F(0x37d00d01);                        // 1/8!
  p = __fadd_rn(__fmul_rn(p, r), SMDM_F(0x39500d01));  // 1/7!
  p = __fadd_rn(__fmul_rn(p, r), SMDM_F(0x3ab60b61));  // 1/6!
  p = __fadd_rn(__fmul_rn(p, r), SMDM_F(0x3c088889));  // 1/5!
  p = __fadd_rn(__fmul_rn(p, r), SMDM_F(0x3d2aaaab));  // 1/4!
  p = __fadd_rn(__fmul_rn(p, r), SMDM_F(0x3e2aaaab));  // 1/3!
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  return __fmul_rn(p, __int_as_float(((int)n + 127) << 23));
}

// Gumbel noise of docs/CONTRACTS.md: u = ((h >> 41) + 0.5) * 2^-23 in float32, g = -log(-log(u)).
// 23 bits so that k + 0.5 is exact in float32 (24 significant bits): u is never 0 or 1, g is finite.
__device__ __forceinline__ float gumbel_f32(u64 h) {
  const float k = (float)(u32)(h >> 41);  // exact: < 2^23
  const float u = __fmul_rn(__fadd_rn(k, 0.5f), SMDM_F(0x34000000));  // * 2^-23
  return -log_f32(-log_f32(u));
}

// Order-preserving map float32 -> uint32 with the order of torch.sort / torch.argmax: larger float <=> larger
// key; -0.0 and +0.0 get the same key (they compare equal, so they tie and rank by index); every NaN, whatever
// its sign and payload, gets the largest key 0xffffffff (torch ranks NaN above +inf). -inf maps to 0x007fffff,
// so keys below that are free for sentinels.
__device__ __forceinline__ u32 float_key(float x) {
  if (x != x) return 0xffffffffu;
  const u32 b = __float_as_uint(__fadd_rn(x, 0.0f));  // -0 + 0 = +0 (round to nearest); other x unchanged
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Fixed-point weight of a probability-like value v in [0, 1]: floor(v * 2^31) (exact scaling, truncation).
__device__ __forceinline__ u32 fixed31(float v) { return __float2uint_rz(__fmul_rn(v, 2147483648.0f)); }

// ---------------------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, at most 1024). `scratch` needs 32 slots of the type.
// Every thread receives the result.
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ u64 block_sum_u64(u64 v, u64* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nw ? scratch[lane] : 0ULL;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ u64 block_max_u64(u64 v, u64* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nw ? scratch[lane] : 0ULL;
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// The order of torch.argmax: NaN above every number (all NaNs equal), otherwise the float order.
__device__ __forceinline__ bool nan_max_greater(float a, float b) { return (a != a) ? (b == b) : (a > b); }
__device__ __forceinline__ bool nan_max_equal(float a, float b) { return (a != a) ? (b != b) : (a == b); }

// (value, index) arg-max in the order of torch.argmax (NaN wins, ties to the lower index). The identity is
// (-inf, 0x7fffffff).
struct ArgMax {
  float v;
  int i;
};
__device__ __forceinline__ ArgMax argmax_merge(ArgMax a, ArgMax b) {
  if (nan_max_greater(b.v, a.v) || (nan_max_equal(b.v, a.v) && b.i < a.i)) return b;
  return a;
}
__device__ __forceinline__ ArgMax block_argmax(ArgMax a, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax b;
    b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
    b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
    a = argmax_merge(a, b);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = a.v;
    si[warp] = a.i;
  }
  __syncthreads();
  if (lane < nw) {
    a.v = sv[lane];
    a.i = si[lane];
  } else {
    a.v = SMDM_NEG_INF;
    a.i = 0x7fffffff;
  }
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax b;
    b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
    b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
    a = argmax_merge(a, b);
  }
  return a;
}

}  // namespace smdm
