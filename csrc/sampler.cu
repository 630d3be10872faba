// sampler.cu — torch launcher of the fused unmasking step (kernels in unmask_sampler.cuh).
// Python (smdm.kernels) allocates the outputs and validates the arguments first; the checks here repeat the
// ones that protect memory safety, with readable messages.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "launch_common.h"
#include "unmask_sampler.cuh"

using namespace smdm_launch;

namespace {

template <int DT, bool UNC>
void launch_rows(const at::Tensor& logits, const void* unc, const at::Tensor& cand, const at::Tensor& seeds,
                 int64_t step, int64_t pos_offset, int L, int V, float scale1, float temperature, int top_k,
                 double top_p, int conf_mode, at::Tensor& pred, at::Tensor& conf, cudaStream_t stream) {
  const size_t smem = (size_t)V * sizeof(float);
  auto kernel = smdm::unmask_rows_kernel<DT, UNC>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const int64_t rows = pred.numel();
  kernel<<<(unsigned)rows, smdm::UNMASK_THREADS, smem, stream>>>(
      logits.data_ptr(), unc, reinterpret_cast<const unsigned char*>(cand.data_ptr()),
      i64p(seeds), step, pos_offset, L, V, scale1, temperature, top_k, top_p, conf_mode,
      i64p(pred), conf.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// logits, uncond: (B, L, V) float32/bfloat16/float16, contiguous; candidates: (B, L) bool; seeds: (B,) int64;
// n_commit: (B,) int64 (mode 0) or None (mode 1, threshold tau); tokens: (B, L) int64 with unit column
// stride (updated in place); pred (B, L) int64, conf (B, L) float32, committed (B, L) bool: outputs.
void unmask_step_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& uncond, const at::Tensor& candidates,
                      const at::Tensor& seeds, int64_t step, int64_t pos_offset, double cfg_scale, double temperature,
                      int64_t top_k, double top_p, int64_t conf_mode, const c10::optional<at::Tensor>& n_commit,
                      double tau, at::Tensor tokens, at::Tensor pred, at::Tensor conf, at::Tensor committed) {
  const char* op = "smdm.unmask_step";
  TORCH_CHECK(logits.dim() == 3, op, ": `logits` must have shape (B, L, V), got ", logits.sizes());
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  check_cuda(logits, op, "logits");
  check_contiguous(logits, op, "logits");
  const int dt = dtype_code(logits, op, "logits", /*allow_f32=*/true);
  TORCH_CHECK(V >= 1 && V < (1LL << 31), op, ": vocabulary size must be in [1, 2^31), got ", V);
  TORCH_CHECK(B * L < (1LL << 31), op, ": B * L must be < 2^31, got ", B * L);
  const void* unc = nullptr;
  if (uncond.has_value()) {
    const at::Tensor& u = *uncond;
    check_same_device(u, logits, op, "uncond_logits");
    check_contiguous(u, op, "uncond_logits");
    check_shape(u, logits.sizes(), op, "uncond_logits");
    TORCH_CHECK(u.scalar_type() == logits.scalar_type(), op, ": `uncond_logits` dtype ", u.scalar_type(),
                " differs from `logits` dtype ", logits.scalar_type());
    unc = u.data_ptr();
  }
  check_same_device(candidates, logits, op, "candidates");
  check_dtype(candidates, at::kBool, op, "candidates");
  check_contiguous(candidates, op, "candidates");
  check_shape(candidates, {B, L}, op, "candidates");
  check_same_device(seeds, logits, op, "seeds");
  check_dtype(seeds, at::kLong, op, "seeds");
  check_contiguous(seeds, op, "seeds");
  check_shape(seeds, {B}, op, "seeds");
  check_same_device(tokens, logits, op, "tokens");
  check_dtype(tokens, at::kLong, op, "tokens");
  check_shape(tokens, {B, L}, op, "tokens");
  TORCH_CHECK(L <= 1 || tokens.stride(1) == 1, op, ": `tokens` needs unit stride along positions, got strides ",
              tokens.strides());
  for (auto* t : {&pred, &conf, &committed}) {
    check_same_device(*t, logits, op, "output");
    check_contiguous(*t, op, "output");
    check_shape(*t, {B, L}, op, "output");
  }
  check_dtype(pred, at::kLong, op, "pred");
  check_dtype(conf, at::kFloat, op, "conf");
  check_dtype(committed, at::kBool, op, "committed");
  int mode = 1;
  const smdm::i64* ncommit_ptr = nullptr;
  if (n_commit.has_value()) {
    mode = 0;
    check_same_device(*n_commit, logits, op, "n_commit");
    check_dtype(*n_commit, at::kLong, op, "n_commit");
    check_contiguous(*n_commit, op, "n_commit");
    check_shape(*n_commit, {B}, op, "n_commit");
    ncommit_ptr = i64p(*n_commit);
  }
  TORCH_CHECK(conf_mode >= 0 && conf_mode <= 2, op, ": unknown confidence mode ", conf_mode);
  if (B * L == 0) return;

  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int dev = logits.get_device(), smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int64_t static_smem = (int64_t)sizeof(smdm::UnmaskScratch);
  TORCH_CHECK(V * 4 + static_smem <= smem_optin, op, ": a vocabulary of ", V, " entries needs ",
              V * 4 + static_smem, " bytes of shared memory per block; this GPU allows ", smem_optin,
              " (use backend='reference')");
  TORCH_CHECK(L * 4 + static_smem <= smem_optin, op, ": sequences of ", L, " positions need ", L * 4 + static_smem,
              " bytes of shared memory per block; this GPU allows ", smem_optin);

  const float scale1 = (float)(cfg_scale + 1.0);
  const float temp = (float)temperature;
  const int k = (int)std::min<int64_t>(std::max<int64_t>(top_k, 0), V);
#define SMDM_ROWS(DT, UNC)                                                                                    \
  launch_rows<DT, UNC>(logits, unc, candidates, seeds, step, pos_offset, (int)L, (int)V, scale1, temp, k, top_p, \
                       (int)conf_mode, pred, conf, stream)
  if (unc) {
    if (dt == 0) SMDM_ROWS(0, true);
    else if (dt == 1) SMDM_ROWS(1, true);
    else SMDM_ROWS(2, true);
  } else {
    if (dt == 0) SMDM_ROWS(0, false);
    else if (dt == 1) SMDM_ROWS(1, false);
    else SMDM_ROWS(2, false);
  }
#undef SMDM_ROWS
  const size_t csmem = (size_t)L * sizeof(float);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(smdm::unmask_commit_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)csmem));
  smdm::unmask_commit_kernel<<<(unsigned)B, smdm::UNMASK_THREADS, csmem, stream>>>(
      i64p(pred), conf.data_ptr<float>(), reinterpret_cast<const unsigned char*>(candidates.data_ptr()),
      ncommit_ptr, (float)tau, mode, (int)L, i64p(tokens), tokens.stride(0),
      reinterpret_cast<unsigned char*>(committed.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
