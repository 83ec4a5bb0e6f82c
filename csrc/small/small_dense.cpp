// The float and double entry points of the small-problem kernels (csrc/small/small_dense.h),
// each compiled three times (AVX-512, AVX2, baseline) and picked at load time, like the row pass
// in csrc/lce/lce_cpu.cpp. Everything else lives in the header.
#include "small/small_dense.h"

namespace fastreg {
namespace small {

#define FASTREG_SMALL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

FASTREG_SMALL_CLONES double ce_small(const SmallCe<float>& a) { return detail::ce_rows(a); }
FASTREG_SMALL_CLONES double ce_small(const SmallCe<double>& a) { return detail::ce_rows(a); }
FASTREG_SMALL_CLONES double mse_small(const SmallMse<float>& a) { return detail::mse_rows(a); }
FASTREG_SMALL_CLONES double mse_small(const SmallMse<double>& a) { return detail::mse_rows(a); }

}  // namespace small
}  // namespace fastreg
