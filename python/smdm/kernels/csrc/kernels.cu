// kernels.cu — every kernel template instantiated once, with no host code. This is the translation unit
// that NVRTC compiles when no CUDA toolkit is installed (smdm.kernels, CuPy backend; the lowered names are
// looked up through name expressions) and the one `smdm kernels check` compiles for each architecture.
#include "flash_attention.cuh"
#include "unmask_sampler.cuh"

namespace smdm {

#define SMDM_ROWS(DT, UNC)                                                                                   \
  template __global__ void unmask_rows_kernel<DT, UNC>(const void*, const void*, const unsigned char*,        \
                                                       const i64*, int, const i64*, i64, const i64*, i64, int, int, \
                                                       float, float, int, double, int, i64*, float*);
SMDM_ROWS(0, false)
SMDM_ROWS(0, true)
SMDM_ROWS(1, false)
SMDM_ROWS(1, true)
SMDM_ROWS(2, false)
SMDM_ROWS(2, true)
#undef SMDM_ROWS

#define SMDM_ATTN(DT, D)                                                                                      \
  template __global__ void flash_attn_fwd_kernel<DT, D, 4>(const AttnParams);                                 \
  template __global__ void flash_attn_fwd_flat<DT, D, 4>(const void*, const void*, const void*, void*, const int*, \
                                                         const int*, i64, i64, i64, i64, i64, i64, i64, i64, i64,  \
                                                         i64, i64, i64, i64, i64, int, int, int, int, float);
SMDM_ATTN(DT_BF16, 64)
SMDM_ATTN(DT_BF16, 128)
SMDM_ATTN(DT_F16, 64)
SMDM_ATTN(DT_F16, 128)
#undef SMDM_ATTN

}  // namespace smdm
