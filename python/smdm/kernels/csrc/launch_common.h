// launch_common.h — shared checks of the torch launchers (host code only; never included by kernel headers).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace smdm_launch {

// int64 tensor data as the kernels' `long long` (int64_t is `long` on Linux: same bits, different type)
inline long long* i64p(const at::Tensor& t) { return reinterpret_cast<long long*>(t.data_ptr()); }

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got a tensor on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but the other inputs are on ",
              ref.device());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous (call .contiguous()), got strides ",
              t.strides());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": `", name, "` must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": `", name, "` must have shape ", want, ", got ", t.sizes());
}

// dtype code shared with the kernel templates (smdm::DType)
inline int dtype_code(const at::Tensor& t, const char* op, const char* name, bool allow_f32) {
  switch (t.scalar_type()) {
    case at::kFloat:
      TORCH_CHECK(allow_f32, op, ": `", name, "` must be bfloat16 or float16, got float32");
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, op, ": `", name, "` must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

}  // namespace smdm_launch
