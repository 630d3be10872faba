// unmask_sampler.cuh — the fused unmasking step of the MDM samplers (DESIGN.md §4, §7; docs/CONTRACTS.md
// "Sampler token choice"). Raw pointers only; compiles with nvcc and NVRTC.
//
// Kernel 1, `unmask_rows_kernel`: one block per logits row (b, j) of a (B, L, V) grid. Rows that are not
// candidates only get pred = -1, conf = -inf. A candidate row is read from HBM once into shared memory as
// float32 guided logits l = u + (w + 1)(c - u), then, all from shared memory:
//   top-k, then top-p cut-off      radix select over order-preserving keys (4 passes of 8 bits); the weight
//                                  of an entry is 1 (top-k) or floor(exp(l - max) 2^31) (top-p), so the
//                                  cut-off is an exact integer decision that does not depend on summation
//                                  order; ties at the cut-off are kept from the lowest vocab id up.
//   token                          T == 0: argmax l (lowest id); T > 0: argmax l/T + g (Gumbel-max with the
//                                  counter-based key (seed[b], step, position, GUMBEL) ^ vocab id).
//   confidence                     prob / margin / negative entropy of softmax(l_filtered), with the
//                                  normaliser S = sum floor(exp(l - max) 2^31) 2^-31 (again order-free).
// Kernel 2, `unmask_commit_kernel`: one block per sequence: choose the positions to commit (top-n by
// confidence, ties to the lower position; or confidence >= tau plus the single most confident) and write the
// chosen tokens into the token buffer in place.
//
// The PyTorch reference (python/smdm/kernels/_reference.py: unmask_step_reference) performs the same float32
// operations in the same order, so token ids, confidences and commits agree bit for bit.
#pragma once
#include "smdm_common.cuh"

namespace smdm {

constexpr int UNMASK_THREADS = 1024;  // threads per block of both kernels (1 block per SM: the row fills smem)

enum ConfMode : int { CONF_PROB = 0, CONF_MARGIN = 1, CONF_NEG_ENTROPY = 2 };

// Shared scratch of the sampler blocks (static shared memory; the row itself is dynamic).
// The radix histogram is two u32 halves (weight = hi * 2^16 + lo) so that every update is a native 32-bit
// shared-memory atomicAdd: a 64-bit shared atomicAdd compiles to a CAS spin loop (ATOMS.CAST.SPIN.64 on
// sm_90), which livelocks-slow when thousands of entries of a row fall into the same few bins. Exact while the
// row has at most 65536 entries (lo < 2^16 and hi <= 2^15 per entry; the launchers check it).
constexpr int UNMASK_MAX_N = 65536;
struct UnmaskScratch {
  u32 hist_lo[256];
  u32 hist_hi[256];
  u64 red_u64[32];
  float red_f[32];
  int red_i[32];
  u32 scan[32];
  u64 bcast[4];
};
static_assert(sizeof(UnmaskScratch) == 2720, "UNMASK_SCRATCH_BYTES in _nvrtc.py and smdm.kernels assume 2720");

// Keys of the radix select: float32 values go through `float_key`; u32 entries are keys already.
__device__ __forceinline__ u32 key_of(float x) { return float_key(x); }
__device__ __forceinline__ u32 key_of(u32 k) { return k; }
// What `apply_cutoff` writes over an entry outside the prefix: -inf for values, key 0 (below every float_key)
// for keys.
__device__ __forceinline__ void drop_entry(float& x) { x = SMDM_NEG_INF; }
__device__ __forceinline__ void drop_entry(u32& k) { k = 0u; }

// Exclusive prefix sum over the block (thread order), every thread gets its own prefix.
__device__ __forceinline__ u32 block_exclusive_scan(u32 v, UnmaskScratch& sc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  u32 incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const u32 t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  __syncthreads();
  if (lane == 31) sc.scan[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    u32 w = lane < nw ? sc.scan[lane] : 0u;
    u32 wi = w;
    for (int o = 1; o < 32; o <<= 1) {
      const u32 t = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += t;
    }
    if (lane < nw) sc.scan[lane] = wi - w;  // exclusive over warps
  }
  __syncthreads();
  return sc.scan[warp] + incl - v;
}

// Cut-off of the descending order (key desc, index asc) of x[0..n), n <= UNMASK_MAX_N: the first element at
// which the running weight reaches `target`. Precondition: 1 <= target <= total weight (else no bin is found).
// weight = 1 (MASS == false) or floor(exp(x - xmax) 2^31) (MASS == true, float x only). Returns the cut-off key
// `theta` and `keep_ties`, the number of entries with key == theta inside the prefix (from the lowest index).
template <bool MASS, typename T>
__device__ void radix_cutoff(const T* x, int n, float xmax, u64 target, UnmaskScratch& sc, u32& theta,
                             u64& keep_ties) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  u32 prefix = 0, pmask = 0;
  u64 above = 0;  // weight of the entries whose key is above the current prefix range
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nt) sc.hist_lo[i] = sc.hist_hi[i] = 0u;
    __syncthreads();
    for (int v = tid; v < n; v += nt) {
      const T xv = x[v];
      const u32 k = key_of(xv);
      if ((k & pmask) == prefix) {
        const u32 bin = (k >> shift) & 255u;
        if constexpr (MASS) {
          const u32 w = fixed31(exp_neg_f32(__fsub_rn(xv, xmax)));  // <= 2^31
          if (w & 0xffffu) atomicAdd(&sc.hist_lo[bin], w & 0xffffu);
          if (w >> 16) atomicAdd(&sc.hist_hi[bin], w >> 16);
        } else {
          atomicAdd(&sc.hist_lo[bin], 1u);
        }
      }
    }
    __syncthreads();
    if (tid < 32) {
      // lane l owns bins 255-8l .. 248-8l (descending), scan lanes in order = bins in descending order
      u64 hw[8];
      u64 local = 0;
      for (int q = 0; q < 8; ++q) {
        const int bin = 255 - 8 * lane - q;
        hw[q] = ((u64)sc.hist_hi[bin] << 16) + (u64)sc.hist_lo[bin];
        local += hw[q];
      }
      u64 incl = local;
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const u64 excl = incl - local;
      if (above + excl < target && above + incl >= target) {
        u64 acc = above + excl;
        for (int q = 0; q < 8; ++q) {
          if (acc + hw[q] >= target) {
            sc.bcast[0] = (u64)(255 - 8 * lane - q);
            sc.bcast[1] = acc;
            break;
          }
          acc += hw[q];
        }
      }
    }
    __syncthreads();
    prefix |= ((u32)sc.bcast[0]) << shift;
    pmask |= 255u << shift;
    above = sc.bcast[1];
    __syncthreads();
  }
  theta = prefix;
  if constexpr (MASS) {
    const float xt = __uint_as_float((prefix & 0x80000000u) ? (prefix & 0x7fffffffu) : ~prefix);
    const u64 w = (u64)fixed31(exp_neg_f32(__fsub_rn(xt, xmax)));  // > 0: the cut-off bin had weight
    keep_ties = (target - above + w - 1) / w;
  } else {
    keep_ties = target - above;
  }
}

// Drop (`drop_entry`) every entry of x[0..n) outside the prefix defined by (theta, keep_ties).
template <typename T>
__device__ void apply_cutoff(T* x, int n, u32 theta, u64 keep_ties, UnmaskScratch& sc) {
  const int tid = threadIdx.x, nt = blockDim.x;
  // contiguous chunks (ties are ranked by index); an odd length keeps the strided smem reads conflict-free
  const int chunk = ((n + nt - 1) / nt) | 1;
  const int beg = min(n, tid * chunk), end = min(n, beg + chunk);
  u32 ties = 0;
  for (int v = beg; v < end; ++v) ties += key_of(x[v]) == theta;
  u64 rank = block_exclusive_scan(ties, sc);
  for (int v = beg; v < end; ++v) {
    const u32 k = key_of(x[v]);
    if (k < theta) {
      drop_entry(x[v]);
    } else if (k == theta) {
      if (rank >= keep_ties) drop_entry(x[v]);
      ++rank;
    }
  }
  __syncthreads();
}

// grid = B * L blocks, block = UNMASK_THREADS, dynamic shared memory = V * sizeof(float).
template <int DT, bool HAS_UNCOND>
__global__ void __launch_bounds__(UNMASK_THREADS)
    unmask_rows_kernel(const void* __restrict__ cond,          // (R, V) rows, dtype DT (R = B * L)
                       const void* __restrict__ uncond,        // (R, V) rows or null
                       const unsigned char* __restrict__ cand,  // (R,) bool, or null: every row
                       const i64* __restrict__ seeds,           // seed of row r: seeds[r / seed_div]
                       int seed_div,
                       const i64* __restrict__ positions,  // (R,) absolute positions, or null: pos_offset + r % L
                       i64 pos_offset,
                       const i64* __restrict__ steps,  // (R,) steps, or null: `step` for every row
                       i64 step, int L, int V,
                       float cfg_scale1,  // w + 1 (float32)
                       float temperature, int top_k, double top_p, int conf_mode,
                       i64* __restrict__ pred,    // (B*L,) out: token or -1
                       float* __restrict__ conf) {  // (B*L,) out: confidence or -inf
  extern __shared__ __align__(16) float lrow[];
  __shared__ UnmaskScratch sc;
  const i64 row = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (cand != nullptr && !cand[row]) {
    if (tid == 0) {
      pred[row] = -1;
      conf[row] = SMDM_NEG_INF;
    }
    return;
  }
  const i64 seed = seeds[row / seed_div];
  const i64 pos = positions != nullptr ? positions[row] : pos_offset + row % L;
  const i64 st = steps != nullptr ? steps[row] : step;

  // ---- 1. read the row once (16-byte streaming loads when aligned), CFG mix, running arg-max ----
  const i64 base = row * (i64)V;
  ArgMax best;
  best.v = SMDM_NEG_INF;
  best.i = 0x7fffffff;
  constexpr int VEC = DT == DT_F32 ? 4 : 8;  // elements per 16-byte load
  constexpr int ESZ = DT == DT_F32 ? 4 : 2;
  const char* crow_ptr = static_cast<const char*>(cond) + base * ESZ;
  const char* urow_ptr = HAS_UNCOND ? static_cast<const char*>(uncond) + base * ESZ : nullptr;
  const bool vec_ok = V % VEC == 0 && ((reinterpret_cast<unsigned long long>(crow_ptr) & 15) == 0) &&
                      (!HAS_UNCOND || (reinterpret_cast<unsigned long long>(urow_ptr) & 15) == 0);
  if (vec_ok) {
    const int nvec = V / VEC;
#pragma unroll 4
    for (int i = tid; i < nvec; i += nt) {
      float x[VEC];
      unpack16<DT>(__ldcs(reinterpret_cast<const uint4*>(crow_ptr) + i), x);
      if (HAS_UNCOND) {
        float u[VEC];
        unpack16<DT>(__ldcs(reinterpret_cast<const uint4*>(urow_ptr) + i), u);
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = __fadd_rn(u[e], __fmul_rn(cfg_scale1, __fsub_rn(x[e], u[e])));
      }
#pragma unroll
      for (int e = 0; e < VEC; e += 4)
        *reinterpret_cast<float4*>(lrow + i * VEC + e) = make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (nan_max_greater(x[e], best.v)) {  // ids increase along a thread: strict keeps the lowest id
          best.v = x[e];
          best.i = i * VEC + e;
        }
      }
    }
  } else {
    for (int v = tid; v < V; v += nt) {
      float l = load_as_float<DT>(cond, base + v);
      if (HAS_UNCOND) {
        const float u = load_as_float<DT>(uncond, base + v);
        l = __fadd_rn(u, __fmul_rn(cfg_scale1, __fsub_rn(l, u)));
      }
      lrow[v] = l;
      if (nan_max_greater(l, best.v)) {
        best.v = l;
        best.i = v;
      }
    }
  }
  best = block_argmax(best, sc.red_f, sc.red_i);  // also a barrier for lrow
  const float m = best.v;
  // = torch.argmax: the first NaN if any (then m = NaN and every z below is NaN: no mass, as in the
  // reference), else the lowest id of the max; a row of -inf only: id 0
  const int top = best.i == 0x7fffffff ? 0 : best.i;

  // ---- 2. top-k, then top-p, by exact integer cut-offs ----
  if (top_k > 0 && top_k < V) {
    u32 theta;
    u64 ties;
    radix_cutoff<false>(lrow, V, m, (u64)top_k, sc, theta, ties);
    apply_cutoff(lrow, V, theta, ties, sc);
  }
  if (top_p < 1.0) {
    u64 s = 0;
    for (int v = tid; v < V; v += nt) {
      const float z = __fsub_rn(lrow[v], m);
      if (z >= -21.5f) s += fixed31(exp_neg_f32(z));  // below: exactly 0 (see step 3)
    }
    s = block_sum_u64(s, sc.red_u64);
    // s == 0 only when m is not finite (no finite entry, a NaN, or +inf): every weight is then 0, the
    // reference keeps everything, and the cut-off search would find no bin (it used to read stale scratch and
    // divide by a zero weight). Otherwise 1 <= need <= s (the max entry alone weighs 2^31).
    if (s > 0) {
      const double need_d = ceil(top_p * (double)s);
      const u64 need = (top_p <= 0.0 || need_d < 1.0) ? 1ULL : (u64)need_d;
      u32 theta;
      u64 ties;
      radix_cutoff<true>(lrow, V, m, need, sc, theta, ties);
      apply_cutoff(lrow, V, theta, ties, sc);
    }
  }

  // ---- 3. normaliser, entropy sum, runner-up, Gumbel-max ----
  u64 s_fix = 0, a_fix = 0;
  ArgMax second;  // best entry other than `top` (for the margin)
  second.v = SMDM_NEG_INF;
  second.i = 0x7fffffff;
  ArgMax pick;  // Gumbel-max winner
  pick.v = SMDM_NEG_INF;
  pick.i = 0x7fffffff;
  const bool sample = temperature > 0.0f;
  const u64 key = rng_key4((u64)seed, (u64)st, (u64)pos, STREAM_GUMBEL);
  // Entries far below the max add exactly 0 to the fixed-point sums (checked exhaustively over float32 in
  // tests/test_kernels.py: floor(exp(z) 2^31) = 0 for z < -21.5, floor(-exp(z) z 2^31) = 0 for z < -26), so
  // their exp is skipped; the results are identical to summing every entry.
  const bool want_entropy = conf_mode == CONF_NEG_ENTROPY;
  const float zcut = want_entropy ? -26.0f : -21.5f;
  for (int v = tid; v < V; v += nt) {
    const float l = lrow[v];
    if (l == SMDM_NEG_INF) continue;  // filtered out
    const float z = __fsub_rn(l, m);
    if (z >= zcut) {
      const float e = exp_neg_f32(z);
      s_fix += fixed31(e);
      if (want_entropy) a_fix += fixed31(-__fmul_rn(e, z));  // -e z in [0, 1/e]
    }
    if (v != top && l > second.v) {
      second.v = l;
      second.i = v;
    }
    if (sample) {
      const float score = __fadd_rn(__fdiv_rn(l, temperature), gumbel_f32(splitmix64(key ^ (u64)v)));
      if (score > pick.v) {
        pick.v = score;
        pick.i = v;
      }
    }
  }
  s_fix = block_sum_u64(s_fix, sc.red_u64);
  a_fix = block_sum_u64(a_fix, sc.red_u64);
  second = block_argmax(second, sc.red_f, sc.red_i);
  if (sample) pick = block_argmax(pick, sc.red_f, sc.red_i);

  if (tid == 0) {
    const int tok = (sample && pick.i != 0x7fffffff) ? pick.i : top;  // every score -inf (T ~ 0): the argmax
    const float s_f = __double2float_rn(__dmul_rn(__ull2double_rn(s_fix), 4.656612873077393e-10));  // 2^-31
    float c;
    if (conf_mode == CONF_PROB) {
      c = __fdiv_rn(exp_neg_f32(__fsub_rn(lrow[tok], m)), s_f);
    } else if (conf_mode == CONF_MARGIN) {
      const float e2 = second.v == SMDM_NEG_INF ? 0.0f : exp_neg_f32(__fsub_rn(second.v, m));
      c = __fdiv_rn(__fsub_rn(1.0f, e2), s_f);
    } else {
      const float a_f = __double2float_rn(-__dmul_rn(__ull2double_rn(a_fix), 4.656612873077393e-10));
      c = __fsub_rn(__fdiv_rn(a_f, s_f), log_f32(s_f));
    }
    pred[row] = tok;
    conf[row] = c;
  }
}

// grid = B blocks, block = UNMASK_THREADS, dynamic shared memory = L * sizeof(u32), L <= UNMASK_MAX_N.
// Candidates are ranked by (confidence desc, position asc) in the order of torch.sort (NaN first, -0 == +0),
// always above non-candidates, even at confidence -inf (= smdm.sampling.select_positions and
// _commit_reference):
// mode 0: commit the min(n_commit[b], #candidates) first candidates;
// mode 1: commit every candidate with conf >= tau, and always the first one.
// `tokens` may be null (only `committed` is written; smdm.kernels.select_positions).
__global__ void __launch_bounds__(UNMASK_THREADS)
    unmask_commit_kernel(const i64* __restrict__ pred, const float* __restrict__ conf,
                         const unsigned char* __restrict__ cand, const i64* __restrict__ n_commit, float tau,
                         int mode, int L, i64* __restrict__ tokens, i64 tokens_row_stride,
                         unsigned char* __restrict__ committed) {
  extern __shared__ u32 ckey[];  // float_key(conf) of candidates (>= 0x007fffff), 0 for the others
  __shared__ UnmaskScratch sc;
  const i64 b = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const i64 base = b * (i64)L;
  u32 ncand = 0;
  u64 best = 0;  // (key << 32) | (0xffffffff - j) of the first candidate in rank order; 0: none
  for (int j = tid; j < L; j += nt) {
    const bool c = cand[base + j] != 0;
    const u32 k = c ? float_key(conf[base + j]) : 0u;
    ckey[j] = k;
    ncand += c;
    if (c) {
      const u64 e = ((u64)k << 32) | (u64)(0xffffffffu - (u32)j);
      best = e > best ? e : best;
    }
  }
  const u64 total = block_sum_u64(ncand, sc.red_u64);  // its barriers also publish ckey
  best = block_max_u64(best, sc.red_u64);
  if (mode == 0) {
    i64 n = n_commit[b];
    if (n > (i64)total) n = (i64)total;
    if (n > 0) {
      u32 theta;
      u64 ties;
      radix_cutoff<false>(ckey, L, 0.0f, (u64)n, sc, theta, ties);
      apply_cutoff(ckey, L, theta, ties, sc);  // ckey[j] != 0 <=> committed (n <= #candidates: no key 0 kept)
    } else {
      for (int j = tid; j < L; j += nt) ckey[j] = 0u;
      __syncthreads();
    }
  }
  const int best_j = best != 0 ? (int)(0xffffffffu - (u32)best) : -1;
  for (int j = tid; j < L; j += nt) {
    const bool c = cand[base + j] != 0;
    bool take;
    if (mode == 0) {
      take = c && ckey[j] != 0u;
    } else {
      take = c && (conf[base + j] >= tau || j == best_j);
    }
    committed[base + j] = take;
    if (take && tokens != nullptr) tokens[b * tokens_row_stride + j] = pred[base + j];
  }
}

}  // namespace smdm
