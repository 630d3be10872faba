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

struct RowsArgs {
  const void* cond;
  const void* uncond;
  const unsigned char* cand;
  const long long* seeds;
  int seed_div;
  const long long* positions;
  int64_t pos_offset;
  const long long* steps;
  int64_t step;
  int L, V;
  float scale1, temperature;
  int top_k;
  double top_p;
  int conf_mode;
  long long* pred;
  float* conf;
  int64_t rows;
};

template <int DT, bool UNC>
void launch_rows_t(const RowsArgs& a, cudaStream_t stream) {
  const size_t smem = (size_t)a.V * sizeof(float);
  auto kernel = smdm::unmask_rows_kernel<DT, UNC>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<(unsigned)a.rows, smdm::UNMASK_THREADS, smem, stream>>>(
      a.cond, a.uncond, a.cand, a.seeds, a.seed_div, a.positions, a.pos_offset, a.steps, a.step, a.L, a.V, a.scale1,
      a.temperature, a.top_k, a.top_p, a.conf_mode, a.pred, a.conf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_rows(int dt, const RowsArgs& a, cudaStream_t stream) {
  if (a.uncond) {
    if (dt == 0) launch_rows_t<0, true>(a, stream);
    else if (dt == 1) launch_rows_t<1, true>(a, stream);
    else launch_rows_t<2, true>(a, stream);
  } else {
    if (dt == 0) launch_rows_t<0, false>(a, stream);
    else if (dt == 1) launch_rows_t<1, false>(a, stream);
    else launch_rows_t<2, false>(a, stream);
  }
}

void launch_commit(const long long* pred, const float* conf, const unsigned char* cand, const long long* n_commit,
                   double tau, int64_t B, int64_t L, long long* tokens, int64_t tokens_row_stride,
                   unsigned char* committed, cudaStream_t stream) {
  const size_t smem = (size_t)L * sizeof(smdm::u32);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(smdm::unmask_commit_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  smdm::unmask_commit_kernel<<<(unsigned)B, smdm::UNMASK_THREADS, smem, stream>>>(
      pred, conf, cand, n_commit, (float)tau, n_commit != nullptr ? 0 : 1, (int)L, tokens, tokens_row_stride,
      committed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_smem(int64_t bytes, const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(bytes / 4 <= smdm::UNMASK_MAX_N, op, ": ", what, " is ", bytes / 4, "; the kernel takes at most ",
              smdm::UNMASK_MAX_N, " (use backend='reference')");
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()));
  const int64_t need = bytes + (int64_t)sizeof(smdm::UnmaskScratch);
  TORCH_CHECK(need <= smem_optin, op, ": ", what, " needs ", need, " bytes of shared memory per block; this GPU allows ",
              smem_optin, " (use backend='reference')");
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
  const smdm::i64* ncommit_ptr = nullptr;
  if (n_commit.has_value()) {
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
  check_smem(V * 4, logits, op, "the vocabulary");
  check_smem(L * 4, logits, op, "the sequence length");
  RowsArgs a{};
  a.cond = logits.data_ptr();
  a.uncond = unc;
  a.cand = reinterpret_cast<const unsigned char*>(candidates.data_ptr());
  a.seeds = i64p(seeds);
  a.seed_div = (int)L;
  a.positions = nullptr;
  a.pos_offset = pos_offset;
  a.steps = nullptr;
  a.step = step;
  a.L = (int)L, a.V = (int)V;
  a.scale1 = (float)(cfg_scale + 1.0);
  a.temperature = (float)temperature;
  a.top_k = (int)std::min<int64_t>(std::max<int64_t>(top_k, 0), V);
  a.top_p = top_p;
  a.conf_mode = (int)conf_mode;
  a.pred = i64p(pred);
  a.conf = conf.data_ptr<float>();
  a.rows = B * L;
  launch_rows(dt, a, stream);
  launch_commit(i64p(pred), conf.data_ptr<float>(), reinterpret_cast<const unsigned char*>(candidates.data_ptr()),
                ncommit_ptr, tau, B, L, i64p(tokens), tokens.stride(0),
                reinterpret_cast<unsigned char*>(committed.data_ptr()), stream);
}

// The row part alone (smdm.kernels.choose_tokens): logits (N, V) contiguous; seeds, positions, steps (N,) int64;
// tokens (N,) int64 and conf (N,) float32 outputs.
void choose_tokens_cuda(const at::Tensor& logits, const at::Tensor& seeds, const at::Tensor& positions,
                        const at::Tensor& steps, double temperature, int64_t top_k, double top_p, int64_t conf_mode,
                        at::Tensor tokens, at::Tensor conf) {
  const char* op = "smdm.choose_tokens";
  TORCH_CHECK(logits.dim() == 2, op, ": `logits` must have shape (N, V), got ", logits.sizes());
  const int64_t N = logits.size(0), V = logits.size(1);
  check_cuda(logits, op, "logits");
  check_contiguous(logits, op, "logits");
  const int dt = dtype_code(logits, op, "logits", /*allow_f32=*/true);
  TORCH_CHECK(V >= 1 && V < (1LL << 31) && N < (1LL << 31), op, ": bad shape ", logits.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&seeds, &positions, &steps, &tokens}) {
    check_same_device(*t, logits, op, "seeds/positions/steps/tokens");
    check_dtype(*t, at::kLong, op, "seeds/positions/steps/tokens");
    check_contiguous(*t, op, "seeds/positions/steps/tokens");
    check_shape(*t, {N}, op, "seeds/positions/steps/tokens");
  }
  check_same_device(conf, logits, op, "conf");
  check_dtype(conf, at::kFloat, op, "conf");
  check_contiguous(conf, op, "conf");
  check_shape(conf, {N}, op, "conf");
  TORCH_CHECK(conf_mode >= 0 && conf_mode <= 2, op, ": unknown confidence mode ", conf_mode);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_smem(V * 4, logits, op, "the vocabulary");
  RowsArgs a{};
  a.cond = logits.data_ptr();
  a.uncond = nullptr;
  a.cand = nullptr;
  a.seeds = i64p(seeds);
  a.seed_div = 1;
  a.positions = i64p(positions);
  a.steps = i64p(steps);
  a.L = 1, a.V = (int)V;
  a.scale1 = 1.0f;
  a.temperature = (float)temperature;
  a.top_k = (int)std::min<int64_t>(std::max<int64_t>(top_k, 0), V);
  a.top_p = top_p;
  a.conf_mode = (int)conf_mode;
  a.pred = i64p(tokens);
  a.conf = conf.data_ptr<float>();
  a.rows = N;
  launch_rows(dt, a, stream);
}

// The commit part alone (smdm.kernels.select_positions): conf (B, P) float32, candidates (B, P) bool,
// n_commit (B,) int64 or None (threshold mode); committed (B, P) bool output.
void select_positions_cuda(const at::Tensor& conf, const at::Tensor& candidates,
                           const c10::optional<at::Tensor>& n_commit, double tau, at::Tensor committed) {
  const char* op = "smdm.select_positions";
  TORCH_CHECK(conf.dim() == 2, op, ": `confidence` must have shape (B, P), got ", conf.sizes());
  const int64_t B = conf.size(0), P = conf.size(1);
  check_cuda(conf, op, "confidence");
  check_contiguous(conf, op, "confidence");
  check_dtype(conf, at::kFloat, op, "confidence");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&candidates, &committed}) {
    check_same_device(*t, conf, op, "candidates/committed");
    check_dtype(*t, at::kBool, op, "candidates/committed");
    check_contiguous(*t, op, "candidates/committed");
    check_shape(*t, {B, P}, op, "candidates/committed");
  }
  const long long* np = nullptr;
  if (n_commit.has_value()) {
    check_same_device(*n_commit, conf, op, "n");
    check_dtype(*n_commit, at::kLong, op, "n");
    check_contiguous(*n_commit, op, "n");
    check_shape(*n_commit, {B}, op, "n");
    np = i64p(*n_commit);
  }
  if (B * P == 0) return;
  TORCH_CHECK(B < (1LL << 31) && P < (1LL << 31), op, ": bad shape ", conf.sizes());
  const c10::cuda::CUDAGuard guard(conf.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_smem(P * 4, conf, op, "the number of positions");
  launch_commit(nullptr, conf.data_ptr<float>(), reinterpret_cast<const unsigned char*>(candidates.data_ptr()), np,
                tau, B, P, nullptr, 0, reinterpret_cast<unsigned char*>(committed.data_ptr()), stream);
}
