// The float and double entry points of the small-problem kernels (csrc/small/small_dense.h),
// each compiled three times on x86-64 ELF (AVX-512, AVX2, baseline: FASTREG_CPU_CLONES, common.h)
// and picked at load time, like the row pass in csrc/lce/lce_cpu.cpp; once elsewhere (aarch64: NEON). Everything else lives in the header.
#include "small/small_dense.h"

namespace fastreg {
namespace small {

#define FASTREG_SMALL_CLONES FASTREG_CPU_CLONES

FASTREG_SMALL_CLONES double ce_small(const SmallCe<float>& a) { return detail::ce_rows(a); }
FASTREG_SMALL_CLONES double ce_small(const SmallCe<double>& a) { return detail::ce_rows(a); }
FASTREG_SMALL_CLONES double mse_small(const SmallMse<float>& a) { return detail::mse_rows(a); }
FASTREG_SMALL_CLONES double mse_small(const SmallMse<double>& a) { return detail::mse_rows(a); }

}  // namespace small
}  // namespace fastreg
