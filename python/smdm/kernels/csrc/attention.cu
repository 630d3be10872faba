// attention.cu — torch launcher of the fused bidirectional attention forward (kernel in flash_attention.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>

#include "flash_attention.cuh"
#include "launch_common.h"

using namespace smdm_launch;

namespace {

constexpr int kWarps = 4;  // BLOCK_M = 64 query rows per CTA

template <int DT, int D>
void launch(const smdm::AttnParams& p, int B, cudaStream_t stream) {
  constexpr int BM = 16 * kWarps;
  const size_t smem = (size_t)(BM + 2 * smdm::ATTN_BLOCK_N) * D * 2 + smdm::ATTN_BLOCK_N * sizeof(int);
  auto kernel = smdm::flash_attn_fwd_kernel<DT, D, kWarps>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  dim3 grid((unsigned)((p.Lq + BM - 1) / BM), (unsigned)p.Hq, (unsigned)B);
  kernel<<<grid, 32 * kWarps, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_qkv(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name);
  TORCH_CHECK(t.dim() == 4, op, ": `", name, "` must have shape (B, H, L, D), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(),
              " but `q` has ", ref.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, op, ": `", name, "` needs a contiguous last dimension, got strides ", t.strides());
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, op, ": `", name,
                "` needs 16-byte aligned rows (strides multiple of 8 elements), got strides ", t.strides(),
                " (call .contiguous())");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": `", name,
              "` must start at a 16-byte aligned address");
}

}  // namespace

// q: (B, Hq, Lq, D), k, v: (B, Hkv, Lk, D), bfloat16 or float16, last dim contiguous; D in {64, 128};
// Hq % Hkv == 0; q_seg (B, Lq) / k_seg (B, Lk) int32 segment ids (both or neither); out: (B, Hq, Lq, D)
// contiguous, same dtype (written).
void flash_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& q_seg, const c10::optional<at::Tensor>& k_seg,
                          at::Tensor out, double scale) {
  const char* op = "smdm.attention";
  check_qkv(q, q, op, "q");
  check_qkv(k, q, op, "k");
  check_qkv(v, q, op, "v");
  const int dt = dtype_code(q, op, "q", /*allow_f32=*/false);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(D == 64 || D == 128, op, ": head dim must be 64 or 128, got ", D);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": batch sizes differ: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, op, ": head dims differ: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": `k` ", k.sizes(), " and `v` ", v.sizes(), " must have the same shape");
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": query heads (", Hq, ") must be a multiple of key/value heads (",
              Hkv, ")");
  TORCH_CHECK(B <= 65535 && Hq <= 65535, op, ": at most 65535 batches and heads, got ", B, " and ", Hq);
  TORCH_CHECK(q_seg.has_value() == k_seg.has_value(), op, ": give both `q_segment_ids` and `k_segment_ids` or neither");
  check_same_device(out, q, op, "out");
  check_contiguous(out, op, "out");
  check_shape(out, q.sizes(), op, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), op, ": `out` dtype must be ", q.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0, op,
              ": `out` must start at a 4-byte aligned address (the kernel stores pairs of elements)");

  smdm::AttnParams p{};
  if (q_seg.has_value()) {
    for (auto* s : {&*q_seg, &*k_seg}) {
      check_same_device(*s, q, op, "segment_ids");
      check_dtype(*s, at::kInt, op, "segment_ids");
      TORCH_CHECK(s->dim() == 2 && s->size(0) == B && s->stride(1) == 1, op,
                  ": segment ids must have shape (B, L) with unit stride along L, got ", s->sizes(), " strides ",
                  s->strides());
    }
    TORCH_CHECK(q_seg->size(1) == Lq, op, ": `q_segment_ids` must have shape (", B, ", ", Lq, "), got ",
                q_seg->sizes());
    TORCH_CHECK(k_seg->size(1) == Lk, op, ": `k_segment_ids` must have shape (", B, ", ", Lk, "), got ",
                k_seg->sizes());
    p.q_seg = q_seg->data_ptr<int>();
    p.k_seg = k_seg->data_ptr<int>();
    p.qs_sb = q_seg->stride(0);
    p.ks_sb = k_seg->stride(0);
  }
  if (B * Hq * Lq == 0) return;
  TORCH_CHECK(Lk >= 1, op, ": need at least one key (Lk = 0)");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.Lq = (int)Lq, p.Lk = (int)Lk, p.Hq = (int)Hq, p.Hkv = (int)Hkv;
  p.scale_log2 = (float)(scale * 1.4426950408889634);

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dt == 1) {
    if (D == 64) launch<smdm::DT_BF16, 64>(p, (int)B, stream);
    else launch<smdm::DT_BF16, 128>(p, (int)B, stream);
  } else {
    if (D == 64) launch<smdm::DT_F16, 64>(p, (int)B, stream);
    else launch<smdm::DT_F16, 128>(p, (int)B, stream);
  }
}
