// CPU kernels of fastreg's fused optimizers: fastreg::_fused_sgd_ and fastreg::_fused_adam_
// (schemas in csrc/fastreg.cpp, update rules in optim_math.h, Python API in fastreg/optim/).
//
// One call updates every tensor of one (device, dtype) group. The elements of all the tensors are
// laid end to end and cut into equal runs for at::parallel_for, so one parallel region covers the
// whole group whatever the mix of tensor sizes (no per-tensor dispatch, no per-tensor region). A
// run is processed tensor piece by tensor piece with vectorised loops over plain float/double
// arrays; bf16/fp16 tensors go through small float staging buffers (math in fp32, one rounding on
// store).
//
// bf16 training modes (fused_*_cpu's BF16Modes): with stochastic rounding the bf16 params are
// stored through optim::bf16_bits_stochastic with Philox bits keyed by each element's index in
// its tensor (so neither the split between threads nor the staging matters); with master weights
// the fp32 master copy takes the params' place in the update and the params receive its rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>
#include "fit/optim_spans.h"
#include "optim/optim_math.h"

#if defined(FASTREG_X86_ISAS)  // (common.h, via optim_math.h)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define FASTREG_NEON 1
#endif

namespace fastreg {
namespace optim_cpu {

using optim::AdamHyper;
using optim::AdamStepScalars;
using optim::SgdHyper;

// ================================================================================================
// Vectorised loops over plain arrays.
//
// SGD: plain `omp simd` loops over the scalar update rule; the compiler vectorises them, on x86-64
// in each of the AVX-512 / AVX2 / baseline clones that target_clones makes of the entry points
// (picked at load time: the binary still runs on a CPU without AVX), on aarch64 for NEON.
//
// Adam: the same would not vectorise, because the build compiles with -fmath-errno, which makes
// every sqrt a call that may set errno. So the Adam loops run the update rule on explicit SIMD
// vectors (GCC/clang vector types: + - * / and selects are portable, only sqrt is an ISA
// instruction), in one function per ISA, with the scalar rule for the tail; on x86-64 the ISA is
// picked once at load time, on aarch64 it is NEON (fsqrt on 128-bit vectors).
// ================================================================================================

#define FASTREG_INLINE inline __attribute__((always_inline))
#define FASTREG_CLONES FASTREG_CPU_CLONES

template <bool MOMENTUM, typename T>
FASTREG_INLINE void sgd_loop(T* __restrict p, const T* __restrict g, T* __restrict buf, int64_t n, bool first,
                             const SgdHyper<T> h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T bi = MOMENTUM ? buf[i] : T(0);
    optim::sgd_update<MOMENTUM>(pi, g[i], bi, first, h);
    p[i] = pi;
    if (MOMENTUM) buf[i] = bi;
  }
}

template <typename V, typename T>
FASTREG_INLINE V loadu(const T* ptr) {
  V r;
  __builtin_memcpy(&r, ptr, sizeof(V));
  return r;
}

template <typename V, typename T>
FASTREG_INLINE void storeu(T* ptr, V x) {
  __builtin_memcpy(ptr, &x, sizeof(V));
}

struct ScalarSqrt {
  template <typename T>
  static void apply(T& x) {
    x = optim::math_sqrt(x);
  }
};

// Adam over n elements: SIMD vectors of type V (lanes of T) with Sqrt::apply(V&) (in place: a vector
// passed by value to a function with a wider target than its caller is an ABI change clang refuses;
// `flatten` inlines it all into the per-ISA entry points anyway), then the scalar rule for the
// remaining n % lanes elements.
template <bool AMSGRAD, typename V, typename Sqrt, typename T>
inline void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                              T* __restrict vmax, int64_t n, const AdamHyper<T> h, const AdamStepScalars<T> s) {
  constexpr int64_t kLanes = static_cast<int64_t>(sizeof(V) / sizeof(T));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V pi = loadu<V>(p + i), mi = loadu<V>(m + i), vi = loadu<V>(v + i);
    V vmi = AMSGRAD ? loadu<V>(vmax + i) : V{};
    const V second = optim::adam_moments<AMSGRAD>(pi, loadu<V>(g + i), mi, vi, vmi, h);
    V root = second;
    Sqrt::apply(root);
    storeu(p + i, optim::adam_apply(pi, mi, root, h, s));
    storeu(m + i, mi);
    storeu(v + i, vi);
    if (AMSGRAD) storeu(vmax + i, vmi);
  }
  for (; i < n; ++i) {
    T vmi = AMSGRAD ? vmax[i] : T(0);
    optim::adam_update<AMSGRAD>(p[i], g[i], m[i], v[i], vmi, h, s);
    if (AMSGRAD) vmax[i] = vmi;
  }
}

template <typename V, typename Sqrt, typename T>
inline void adam_simd(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, const AdamHyper<T>& h,
                              const AdamStepScalars<T>& s) {
  if (vmax != nullptr) {
    adam_loop<true, V, Sqrt>(p, g, m, v, vmax, n, h, s);
  } else {
    adam_loop<false, V, Sqrt>(p, g, m, v, vmax, n, h, s);
  }
}

template <typename T>
using AdamSpanFn = void (*)(T*, const T*, T*, T*, T*, int64_t, const AdamHyper<T>&, const AdamStepScalars<T>&);

// One Adam entry point per ISA and dtype: NAME_f32 / NAME_f64 on vectors VF / VD with sqrt SQRT.
// `flatten` inlines the whole loop, sqrt included, into the entry point, i.e. under its ISA.
#define FASTREG_ADAM_ISA(NAME, ATTR, VF, VD, SQRT)                                                       \
  ATTR __attribute__((flatten)) void NAME##_f32(float* p, const float* g, float* m, float* v, float* vmax, int64_t n,            \
                       const AdamHyper<float>& h, const AdamStepScalars<float>& s) {                    \
    adam_simd<VF, SQRT>(p, g, m, v, vmax, n, h, s);                                                     \
  }                                                                                                     \
  ATTR __attribute__((flatten)) void NAME##_f64(double* p, const double* g, double* m, double* v, double* vmax, int64_t n,       \
                       const AdamHyper<double>& h, const AdamStepScalars<double>& s) {                  \
    adam_simd<VD, SQRT>(p, g, m, v, vmax, n, h, s);                                                     \
  }

#if defined(FASTREG_X86_ISAS)
typedef float vf16 __attribute__((vector_size(64)));
typedef double vd8 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));

#define FASTREG_AVX512 __attribute__((target("avx512f")))
#define FASTREG_AVX2 __attribute__((target("avx2")))
struct Avx512Sqrt {  // (the maskz form: the plain one starts from an "undefined" vector GCC warns about)
  FASTREG_AVX512 static inline void apply(vf16& x) { x = (vf16)_mm512_maskz_sqrt_ps(0xFFFF, (__m512)x); }
  FASTREG_AVX512 static inline void apply(vd8& x) { x = (vd8)_mm512_maskz_sqrt_pd(0xFF, (__m512d)x); }
};
struct Avx2Sqrt {
  FASTREG_AVX2 static inline void apply(vf8& x) { x = (vf8)_mm256_sqrt_ps((__m256)x); }
  FASTREG_AVX2 static inline void apply(vd4& x) { x = (vd4)_mm256_sqrt_pd((__m256d)x); }
};
struct Sse2Sqrt {  // SSE2 is part of x86-64 itself
  static inline void apply(vf4& x) { x = (vf4)_mm_sqrt_ps((__m128)x); }
  static inline void apply(vd2& x) { x = (vd2)_mm_sqrt_pd((__m128d)x); }
};

FASTREG_ADAM_ISA(adam_avx512, FASTREG_AVX512, vf16, vd8, Avx512Sqrt)
FASTREG_ADAM_ISA(adam_avx2, FASTREG_AVX2, vf8, vd4, Avx2Sqrt)
FASTREG_ADAM_ISA(adam_sse2, , vf4, vd2, Sse2Sqrt)

enum class X86Isa { kAvx512, kAvx2, kSse2 };
// The same order as the target_clones resolver: avx512f, then avx2, then the baseline.
X86Isa x86_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return X86Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return X86Isa::kAvx2;
  return X86Isa::kSse2;
}

template <typename T>
AdamSpanFn<T> pick_adam_span(AdamSpanFn<T> avx512, AdamSpanFn<T> avx2, AdamSpanFn<T> sse2) {
  switch (x86_isa()) {
    case X86Isa::kAvx512: return avx512;
    case X86Isa::kAvx2: return avx2;
    default: return sse2;
  }
}
const AdamSpanFn<float> adam_f32 = pick_adam_span<float>(adam_avx512_f32, adam_avx2_f32, adam_sse2_f32);
const AdamSpanFn<double> adam_f64 = pick_adam_span<double>(adam_avx512_f64, adam_avx2_f64, adam_sse2_f64);
#elif defined(FASTREG_NEON)
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));
struct NeonSqrt {
  static inline void apply(vf4& x) { x = (vf4)vsqrtq_f32((float32x4_t)x); }
  static inline void apply(vd2& x) { x = (vd2)vsqrtq_f64((float64x2_t)x); }
};
FASTREG_ADAM_ISA(adam_neon, , vf4, vd2, NeonSqrt)
const AdamSpanFn<float> adam_f32 = adam_neon_f32;
const AdamSpanFn<double> adam_f64 = adam_neon_f64;
#else
FASTREG_ADAM_ISA(adam_portable, , float, double, ScalarSqrt)
const AdamSpanFn<float> adam_f32 = adam_portable_f32;
const AdamSpanFn<double> adam_f64 = adam_portable_f64;
#endif

inline void adam_span(float* p, const float* g, float* m, float* v, float* vmax, int64_t n, const AdamHyper<float>& h,
                      const AdamStepScalars<float>& s) {
  adam_f32(p, g, m, v, vmax, n, h, s);
}
inline void adam_span(double* p, const double* g, double* m, double* v, double* vmax, int64_t n,
                      const AdamHyper<double>& h, const AdamStepScalars<double>& s) {
  adam_f64(p, g, m, v, vmax, n, h, s);
}

FASTREG_CLONES void sgd_span(float* p, const float* g, float* buf, int64_t n, bool first,
                                 const SgdHyper<float>& h) {
  if (buf != nullptr) {
    sgd_loop<true>(p, g, buf, n, first, h);
  } else {
    sgd_loop<false>(p, g, buf, n, first, h);
  }
}

FASTREG_CLONES void sgd_span(double* p, const double* g, double* buf, int64_t n, bool first,
                                 const SgdHyper<double>& h) {
  if (buf != nullptr) {
    sgd_loop<true>(p, g, buf, n, first, h);
  } else {
    sgd_loop<false>(p, g, buf, n, first, h);
  }
}

// ---- entry points for fit() (declared in csrc/fit/optim_spans.h) -----------------------------
void adam_span_for_fit(float* p, const float* g, float* m, float* v, float* vmax, int64_t n,
                       const AdamHyper<float>& h, const AdamStepScalars<float>& s) {
  adam_span(p, g, m, v, vmax, n, h, s);
}
void adam_span_for_fit(double* p, const double* g, double* m, double* v, double* vmax, int64_t n,
                       const AdamHyper<double>& h, const AdamStepScalars<double>& s) {
  adam_span(p, g, m, v, vmax, n, h, s);
}
void sgd_span_for_fit(float* p, const float* g, float* buf, int64_t n, bool first, const SgdHyper<float>& h) {
  sgd_span(p, g, buf, n, first, h);
}
void sgd_span_for_fit(double* p, const double* g, double* buf, int64_t n, bool first, const SgdHyper<double>& h) {
  sgd_span(p, g, buf, n, first, h);
}

// bf16 / fp16: stage kStage elements at a time in float buffers, run the fp32 loop, round back.
constexpr int64_t kStage = 256;
// Where threads may split a tensor (FlatGroup::for_each_piece): a multiple of every SIMD width times
// unroll (64 floats = four AVX-512 vectors) that divides kStage, so staging chunks keep the alignment.
constexpr int64_t kSplitBlock = 64;
static_assert(kStage % kSplitBlock == 0, "staging chunks must start at split-block multiples");

template <typename S>
FASTREG_INLINE void load_stage(float* dst, const S* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename S>
FASTREG_INLINE void store_stage(S* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

// Applies `f(float* a[kArrays], k)` to staged copies of `arrays` (nullptr entries stay nullptr);
// arrays listed in `written` are stored back.
template <int kArrays, typename S, typename F>
void staged(S* const (&arrays)[kArrays], const bool (&written)[kArrays], int64_t n, F f) {
  float buffers[kArrays][kStage];
  float* staged_ptrs[kArrays];
  for (int64_t off = 0; off < n; off += kStage) {
    const int64_t k = std::min(kStage, n - off);
    for (int a = 0; a < kArrays; ++a) {
      staged_ptrs[a] = arrays[a] != nullptr ? buffers[a] : nullptr;
      if (arrays[a] != nullptr) load_stage(buffers[a], arrays[a] + off, k);
    }
    f(staged_ptrs, k);
    for (int a = 0; a < kArrays; ++a) {
      if (arrays[a] != nullptr && written[a]) store_stage(arrays[a] + off, buffers[a], k);
    }
  }
}

// ================================================================================================
// Argument checking and the flattened view of one dtype group
// ================================================================================================

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Thousands of small tensors mean thousands of scattered TensorImpl / StorageImpl objects, each a
// cache miss when first touched; the loops over them fetch a few tensors ahead.
constexpr size_t kAheadImpl = 8;     // tensors ahead whose TensorImpl is fetched
constexpr size_t kAheadStorage = 4;  // tensors ahead whose StorageImpl is fetched (impl already near)

inline void prefetch_impl(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
}

inline void prefetch_storage(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->has_storage()) __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
}

// A Tensor[] argument read in place from the dispatcher's stack: unlike at::TensorList, which the
// unboxing wrapper would fill with a copy of every tensor, indexing it touches no reference count
// (with thousands of tensors those copies, and their release, are a large part of a call).
class TensorRefs {
 public:
  // (None, for an optional list argument, reads as an empty list)
  explicit TensorRefs(const c10::IValue& list)
      : items_(list.isNone() ? c10::ArrayRef<c10::IValue>() : list.toListRef()) {}
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const at::Tensor& operator[](size_t i) const { return items_[i].toTensor(); }

 private:
  c10::ArrayRef<c10::IValue> items_;
};

// The tensors of one dtype group, list by list (params, grads, state...), checked and flattened.
// Each tensor set (params[i], grads[i], states[i]...) is processed as one flat array of
// params[i].numel() elements: directly when the tensors share one dense layout, else through
// contiguous temporaries that are copied back by finish().
class FlatGroup {
 public:
  // fp32_list: the index of a list of float32 tensors in a bf16/fp16 group (the master weights),
  // or -1; every other list has the params' dtype.
  FlatGroup(const char* op, const std::vector<std::pair<const char*, TensorRefs>>& lists,
            const std::vector<bool>& written, int64_t fp32_list = -1)
      : num_lists_(static_cast<int64_t>(lists.size())) {
    const TensorRefs& params = lists[0].second;
    num_tensors_ = static_cast<int64_t>(params.size());
    TORCH_CHECK(num_tensors_ > 0, op, ": the params list is empty");
    for (const auto& [name, list] : lists) {
      TORCH_CHECK(static_cast<int64_t>(list.size()) == num_tensors_, op, ": ", name, " has ", list.size(),
                  " tensors but params has ", num_tensors_);
    }
    dtype_ = params[0].scalar_type();
    elem_size_ = static_cast<int64_t>(c10::elementSize(dtype_));
    TORCH_CHECK(is_float_dtype(dtype_), op, ": params must be float32, float64, bfloat16 or float16, got ", dtype_);
    ptrs_.resize(num_tensors_ * num_lists_);
    offsets_.resize(num_tensors_ + 1, 0);
    block_offsets_.resize(num_tensors_ + 1, 0);
    for (int64_t i = 0; i < num_tensors_; ++i) {
      for (int64_t l = 0; l < num_lists_; ++l) {
        const TensorRefs& list = lists[l].second;
        if (i + kAheadImpl < list.size()) prefetch_impl(list[i + kAheadImpl]);
        if (i + kAheadStorage < list.size()) prefetch_storage(list[i + kAheadStorage]);
      }
      const at::Tensor& p = params[i];
      bool contiguous = true;
      bool same_dense_layout = true;
      for (int64_t l = 0; l < num_lists_; ++l) {
        const at::Tensor& t = lists[l].second[i];
        const char* name = lists[l].first;
        TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
        TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is sparse; sparse gradients are not supported");
        TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
                    " but this group's params are on cpu (one call takes tensors of one device)");
        if (l == fp32_list) {
          TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                      " but master weights must be float32");
        } else {
          TORCH_CHECK(t.scalar_type() == dtype_, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                      " but params has ", dtype_, " (one call takes tensors of one dtype)");
        }
        TORCH_CHECK(t.sizes().equals(p.sizes()), op, ": ", name, "[", i, "] has shape ", t.sizes(),
                    " but params[", i, "] has shape ", p.sizes());
        contiguous = contiguous && t.is_contiguous();
        ptrs_[i * num_lists_ + l] = static_cast<char*>(t.data_ptr());
      }
      if (!contiguous) {  // flat walking needs one dense layout shared by the whole set
        same_dense_layout = p.is_non_overlapping_and_dense();
        for (int64_t l = 1; l < num_lists_; ++l) {
          same_dense_layout = same_dense_layout && lists[l].second[i].strides().equals(p.strides());
        }
      }
      if (!contiguous && !same_dense_layout) {
        for (int64_t l = 0; l < num_lists_; ++l) {
          const at::Tensor& t = lists[l].second[i];
          if (t.is_contiguous()) continue;
          at::Tensor tmp = t.contiguous();
          ptrs_[i * num_lists_ + l] = static_cast<char*>(tmp.data_ptr());
          if (written[l]) writeback_.emplace_back(t, tmp);
          else keep_alive_.push_back(std::move(tmp));
        }
      }
      offsets_[i + 1] = offsets_[i] + p.numel();
      block_offsets_[i + 1] = block_offsets_[i] + (p.numel() + kSplitBlock - 1) / kSplitBlock;
    }
  }

  int64_t num_tensors() const { return num_tensors_; }
  at::ScalarType dtype() const { return dtype_; }

  // Base pointer of list `l`, tensor `i`, as T*.
  template <typename T>
  T* ptr(int64_t i, int64_t l) const {
    return reinterpret_cast<T*>(ptrs_[i * num_lists_ + l]);
  }

  // Calls f(tensor, first_element, count) for every piece of every tensor, all of them inside
  // one parallel region that splits the concatenated elements evenly between threads.
  //
  // Threads split a tensor only at multiples of kSplitBlock elements counted from its start, so
  // every piece but a tensor's last is a whole number of SIMD vectors (of any ISA, unrolled) and
  // the vector loops' scalar tails, whose rounding can differ by an ulp (FMA contraction), fall on
  // the same elements whatever the thread count: results are bitwise independent of it.
  template <typename F>
  void for_each_piece(F f) const {
    const int64_t total_blocks = block_offsets_.back();
    constexpr int64_t kGrainBlocks = 32768 / kSplitBlock;
    at::parallel_for(0, total_blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
      int64_t i = std::upper_bound(block_offsets_.begin(), block_offsets_.end(), begin) - block_offsets_.begin() - 1;
      while (begin < end) {
        const int64_t stop = std::min(end, block_offsets_[i + 1]);
        if (stop < end) prefetch_head(i + 1);
        if (stop > begin) {
          const int64_t first = (begin - block_offsets_[i]) * kSplitBlock;
          const int64_t last = std::min((stop - block_offsets_[i]) * kSplitBlock, offsets_[i + 1] - offsets_[i]);
          f(i, first, last - first);
        }
        begin = stop;
        ++i;
      }
    });
  }

  // Small tensors are separate short memory streams that the hardware prefetcher only picks up
  // after a few misses: start fetching the head of every array of the next tensor before working
  // on the current one.
  void prefetch_head(int64_t i) const {
    constexpr int64_t kHeadBytes = 1024;
    const int64_t bytes = std::min(kHeadBytes, (offsets_[i + 1] - offsets_[i]) * elem_size_);
    for (int64_t l = 0; l < num_lists_; ++l) {
      const char* base = ptrs_[i * num_lists_ + l];
      // (read/write must be a constant for clang: list 1 is the gradients, which are only read)
      if (l == 1) {
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b, 0);
      } else {
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b, 1);
      }
    }
  }

  // Copies the results held in contiguous temporaries back into their strided tensors.
  void finish() {
    for (auto& [dst, src] : writeback_) dst.copy_(src);
  }

 private:
  int64_t num_lists_;
  int64_t num_tensors_ = 0;
  at::ScalarType dtype_ = at::kFloat;
  int64_t elem_size_ = 4;
  std::vector<char*> ptrs_;
  std::vector<int64_t> offsets_;        // first element of tensor i in the concatenation
  std::vector<int64_t> block_offsets_;  // the same in kSplitBlock units, each tensor rounded up
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback_;
  std::vector<at::Tensor> keep_alive_;  // contiguous copies of read-only tensors
};

// Runs f(tensor, arrays, count) over every piece of the group, in one parallel region, where
// arrays[a] points into list lists[a] (nullptr where lists[a] < 0) as T = the math type: directly
// for fp32/fp64 groups, through float staging buffers (stored back where written[a]) for bf16/fp16.
template <typename T, int kArrays, typename F>
void run_pieces(const FlatGroup& group, const int64_t (&lists)[kArrays], const bool (&written)[kArrays], F f) {
  if (group.dtype() == c10::CppTypeToScalarType<T>::value) {
    group.for_each_piece([&](int64_t i, int64_t off, int64_t len) {
      T* arrays[kArrays];
      for (int a = 0; a < kArrays; ++a) arrays[a] = lists[a] < 0 ? nullptr : group.ptr<T>(i, lists[a]) + off;
      f(i, arrays, len);
    });
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(group.dtype(), "fastreg_optim_cpu", [&] {
      group.for_each_piece([&](int64_t i, int64_t off, int64_t len) {
        scalar_t* arrays[kArrays];
        for (int a = 0; a < kArrays; ++a) {
          arrays[a] = lists[a] < 0 ? nullptr : group.ptr<scalar_t>(i, lists[a]) + off;
        }
        staged(arrays, written, len, [&](float* const* staged_arrays, int64_t k) { f(i, staged_arrays, k); });
      });
    });
  } else {
    TORCH_CHECK(false, "fastreg optimizers: no ", c10::CppTypeToScalarType<T>::value, " math for ", group.dtype());
  }
}

// ================================================================================================
// bf16 training modes
// ================================================================================================

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the stochastic-rounding streams read Philox words as "
              "little-endian 16-bit halves");
// Known-answer tests of Random123 for Philox4x32-10 (checked at compile time).
static_assert(optim::philox4x32_10(optim::Philox4{{0, 0, 0, 0}}, 0, 0).v[0] == 0x6627e8d5u &&
                  optim::philox4x32_10(optim::Philox4{{0, 0, 0, 0}}, 0, 0).v[3] == 0x9b00dbd8u,
              "Philox4x32-10 known answer (zero counter and key)");
static_assert(optim::philox4x32_10(optim::Philox4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                                   0xa4093822u, 0x299f31d0u)
                      .v[1] == 0x94fdccebu,
              "Philox4x32-10 known answer (pi digits)");

// What a call does beyond the plain update (fastreg's bf16 training modes); all off by default.
struct BF16Modes {
  int64_t sr_seed = -1;                    // >= 0: stochastic rounding of bf16 params with this seed
  const TensorRefs* sr_steps = nullptr;    // SGD: the per-param step counters keying the streams
  const TensorRefs* master = nullptr;      // fp32 master weights (parallel to params), or none
  bool stochastic() const { return sr_seed >= 0; }
  bool has_master() const { return master != nullptr && !master->empty(); }
};

// The per-call checks of the modes, given the params' dtype.
void check_modes(const char* op, const BF16Modes& modes, at::ScalarType dtype) {
  TORCH_CHECK(!(modes.stochastic() && modes.has_master()), op,
              ": stochastic rounding and master weights are exclusive (the params are the nearest rounding of "
              "their master copy)");
  TORCH_CHECK(!modes.stochastic() || dtype == at::kBFloat16, op,
              ": stochastic rounding needs bfloat16 params, got ", dtype);
  TORCH_CHECK(!modes.has_master() || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": master weights need bfloat16 or float16 params, got ", dtype);
}

// Appends the master weights (when used) to a call's lists; returns their index, or -1.
int64_t append_master_list(const BF16Modes& modes, std::vector<std::pair<const char*, TensorRefs>>& lists,
                           std::vector<bool>& written) {
  if (!modes.has_master()) return -1;
  lists.emplace_back("master_params", *modes.master);
  written.push_back(true);
  return static_cast<int64_t>(lists.size()) - 1;
}

// Stores n floats as bf16 with stochastic rounding; src[j] is element first + j of tensor
// `tensor`. The Philox blocks covering the range are generated into a buffer whose 16-bit halves
// are then the elements' random bits in order (optim::sr_random16 defines the layout).
FASTREG_CLONES void store_bf16_stochastic(c10::BFloat16* dst, const float* src, int64_t n, uint64_t seed,
                                          uint32_t step, uint32_t tensor, int64_t first) {
  constexpr int64_t kPer = optim::kSrElementsPerBlock;
  constexpr int64_t kMaxBlocks = kStage / kPer + 1;
  alignas(64) uint32_t word[4][kMaxBlocks];   // word w of block b0 + b, one array per word: vectorises
  alignas(64) uint16_t bits[kMaxBlocks * kPer];
  const int64_t b0 = first / kPer;
  const int64_t blocks = (first + n + kPer - 1) / kPer - b0;
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    const optim::Philox4 r = optim::sr_block(seed, step, tensor, static_cast<uint64_t>(b0 + b));
    word[0][b] = r.v[0];
    word[1][b] = r.v[1];
    word[2][b] = r.v[2];
    word[3][b] = r.v[3];
  }
  for (int64_t b = 0; b < blocks; ++b) {
    for (int w = 0; w < 4; ++w) {
      bits[b * kPer + 2 * w] = static_cast<uint16_t>(word[w][b]);
      bits[b * kPer + 2 * w + 1] = static_cast<uint16_t>(word[w][b] >> 16);
    }
  }
  const uint16_t* random16 = bits + (first - b0 * kPer);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = optim::bf16_bits_stochastic(src[j], random16[j]);
}

// run_pieces for a bf16/fp16 group in one of the modes: f(i, arrays, k) as there, but slot 0 (the
// params) is, with master weights, the fp32 master copy itself (list `master_list`, updated in
// place; the params then get its nearest rounding), and with stochastic rounding the staged
// params are stored by store_bf16_stochastic with tensor i's step key sr_steps[i].
template <int kArrays, typename F>
void run_pieces_modes(const FlatGroup& group, const int64_t (&lists)[kArrays], const bool (&written)[kArrays],
                      const BF16Modes& modes, int64_t master_list, const std::vector<uint32_t>& sr_steps, F f) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(group.dtype(), "fastreg_optim_cpu_modes", [&] {
    group.for_each_piece([&](int64_t i, int64_t off, int64_t len) {
      float buffers[kArrays][kStage];
      float* staged_ptrs[kArrays];
      scalar_t* arrays[kArrays];
      for (int a = 0; a < kArrays; ++a) arrays[a] = lists[a] < 0 ? nullptr : group.ptr<scalar_t>(i, lists[a]) + off;
      float* master = modes.has_master() ? group.ptr<float>(i, master_list) + off : nullptr;
      for (int64_t done = 0; done < len; done += kStage) {
        const int64_t k = std::min(kStage, len - done);
        for (int a = 0; a < kArrays; ++a) {
          staged_ptrs[a] = arrays[a] != nullptr ? buffers[a] : nullptr;
          if (arrays[a] != nullptr && !(a == 0 && master != nullptr)) load_stage(buffers[a], arrays[a] + done, k);
        }
        if (master != nullptr) staged_ptrs[0] = master + done;
        f(i, staged_ptrs, k);
        for (int a = 1; a < kArrays; ++a) {
          if (arrays[a] != nullptr && written[a]) store_stage(arrays[a] + done, buffers[a], k);
        }
        if (master != nullptr) {
          store_stage(arrays[0] + done, master + done, k);
        } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          store_bf16_stochastic(arrays[0] + done, buffers[0], k, static_cast<uint64_t>(modes.sr_seed), sr_steps[i],
                                static_cast<uint32_t>(i), off + done);
        }
      }
    });
  });
}

// Calls f(T()) with T = the math type of a parameter dtype: double for fp64, float otherwise.
template <typename F>
void with_math_type(at::ScalarType dtype, F f) {
  if (dtype == at::kDouble) {
    f(double());
  } else {
    f(float());
  }
}

// A one-element CPU tensor argument (lr, grad_scale, found_inf), read as double.
std::optional<double> read_scalar_arg(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(), " but the params are on cpu");
  TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t->scalar_type());
  return t->item<double>();
}

// The per-call scalars every optimizer shares. skip: found_inf is set and nonzero, in which case
// nothing at all may change.
struct CommonArgs {
  double lr;
  double inv_grad_scale;
  bool skip;
};

CommonArgs read_common_args(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  CommonArgs a;
  a.lr = read_scalar_arg(op, "lr_tensor", lr_tensor).value_or(lr);
  const std::optional<double> scale = read_scalar_arg(op, "grad_scale", grad_scale);
  a.inv_grad_scale = scale.has_value() ? 1.0 / *scale : 1.0;
  a.skip = read_scalar_arg(op, "found_inf", found_inf).value_or(0.0) != 0.0;
  return a;
}

// Where the per-tensor counters/flags (state_steps, momentum_started) live: either one
// one-element tensor per parameter, or a single contiguous tensor holding all n of them (what the
// Python optimizers pass: the per-parameter counters are views into it).
struct Counters {
  std::vector<void*> ptr;
  bool f64 = false;  // state_steps only: float64 counters (else float32; flags are uint8/bool)
};

Counters counter_pointers(const char* op, const char* name, const TensorRefs& list, int64_t n,
                          std::initializer_list<at::ScalarType> dtypes) {
  auto check_dtype = [&](const at::Tensor& t, int64_t i) {
    TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end(), op, ": ", name, "[", i,
                "] has unsupported dtype ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), " but the params are on cpu");
  };
  Counters out;
  out.ptr.resize(n);
  if (list.size() == 1 && n > 1) {  // packed
    const at::Tensor& t = list[0];
    TORCH_CHECK(t.defined() && t.numel() == n && t.is_contiguous(), op, ": ", name,
                " must hold one one-element tensor per param, or one contiguous tensor of ", n, " elements");
    check_dtype(t, 0);
    out.f64 = t.scalar_type() == at::kDouble;
    char* base = static_cast<char*>(t.data_ptr());
    for (int64_t i = 0; i < n; ++i) out.ptr[i] = base + i * t.element_size();
    return out;
  }
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", name, " has ", list.size(),
              " tensors but params has ", n);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAheadImpl < list.size()) prefetch_impl(list[i + kAheadImpl]);
    if (i + kAheadStorage < list.size()) prefetch_storage(list[i + kAheadStorage]);
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, "[", i, "] must be a one-element tensor");
    check_dtype(t, i);
    TORCH_CHECK((t.scalar_type() == at::kDouble) == (list[0].scalar_type() == at::kDouble), op, ": ", name,
                " mixes float32 and float64 counters");
    out.ptr[i] = t.data_ptr();
  }
  out.f64 = list[0].scalar_type() == at::kDouble;
  return out;
}

// ================================================================================================
// SGD
// ================================================================================================

// SGD's stochastic-rounding step counters: increments each and returns the new counts as keys.
std::vector<uint32_t> advance_counters(const Counters& counters) {
  std::vector<uint32_t> keys(counters.ptr.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    if (counters.f64) {
      keys[i] = optim::sr_step_key(*static_cast<double*>(counters.ptr[i]) += 1.0);
    } else {
      keys[i] = optim::sr_step_key(*static_cast<float*>(counters.ptr[i]) += 1.0f);
    }
  }
  return keys;
}

void fused_sgd_cpu(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& momentum_buffers,
                   const TensorRefs& momentum_started, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const BF16Modes& modes = {}) {
  constexpr const char* op = "fastreg::_fused_sgd_";
  const bool use_momentum = momentum != 0.0;
  std::vector<std::pair<const char*, TensorRefs>> lists = {{"params", params}, {"grads", grads}};
  std::vector<bool> written = {true, false};
  Counters flags;
  if (use_momentum) {
    lists.emplace_back("momentum_buffers", momentum_buffers);
    written.push_back(true);
    flags = counter_pointers(op, "momentum_started", momentum_started, static_cast<int64_t>(params.size()),
                             {at::kByte, at::kBool});
  } else {
    TORCH_CHECK(momentum_buffers.empty() && momentum_started.empty(), op,
                ": momentum is 0 so momentum_buffers and momentum_started must be empty");
  }
  const int64_t master_list = append_master_list(modes, lists, written);
  FlatGroup group(op, lists, written, master_list);
  check_modes(op, modes, group.dtype());
  Counters sr_counters;
  if (modes.stochastic()) {
    TORCH_CHECK(modes.sr_steps != nullptr, op, ": stochastic rounding needs sr_steps");
    sr_counters = counter_pointers(op, "sr_steps", *modes.sr_steps, group.num_tensors(), {at::kFloat, at::kDouble});
  }
  const CommonArgs args = read_common_args(op, lr, lr_tensor, grad_scale, found_inf);
  if (args.skip) return;

  const int64_t n = group.num_tensors();
  const std::vector<uint32_t> sr_steps = advance_counters(sr_counters);
  // first[i]: the momentum buffer of tensor i has never been written (torch's `buf is None`).
  std::vector<uint8_t> first(n, 0);
  if (use_momentum) {
    for (int64_t i = 0; i < n; ++i) {
      uint8_t* flag = static_cast<uint8_t*>(flags.ptr[i]);
      first[i] = *flag == 0;
      *flag = 1;
    }
  }
  const int64_t slots[3] = {0, 1, use_momentum ? 2 : -1};
  constexpr bool kWritten[3] = {true, false, true};
  with_math_type(group.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const auto h = optim::make_sgd_hyper<T>(args.lr, momentum, dampening, weight_decay, args.inv_grad_scale,
                                             nesterov, maximize);
    auto span = [&](int64_t i, T* const* a, int64_t k) { sgd_span(a[0], a[1], a[2], k, first[i], h); };
    if constexpr (std::is_same_v<T, float>) {
      if (modes.stochastic() || modes.has_master()) {
        run_pieces_modes(group, slots, kWritten, modes, master_list, sr_steps, span);
        return;
      }
    }
    run_pieces<T>(group, slots, kWritten, span);
  });
  group.finish();
}

// ================================================================================================
// Adam / AdamW
// ================================================================================================

// Increments every step counter (in its own dtype, like torch's `step += 1`) and returns the
// per-tensor scalars that follow from the new count; sr_steps (when given) receives the
// stochastic-rounding step key of each tensor.
template <typename T>
std::vector<AdamStepScalars<T>> advance_steps(const Counters& counters, const AdamHyper<T>& h,
                                              std::vector<uint32_t>* sr_steps) {
  const size_t n = counters.ptr.size();
  std::vector<AdamStepScalars<T>> out(n);
  if (sr_steps != nullptr) sr_steps->resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (i + kAheadImpl < n) __builtin_prefetch(counters.ptr[i + kAheadImpl], 1);
    T step;
    if (counters.f64) {
      double* c = static_cast<double*>(counters.ptr[i]);
      *c += 1.0;
      step = static_cast<T>(*c);
      if (sr_steps != nullptr) (*sr_steps)[i] = optim::sr_step_key(*c);
    } else {
      float* c = static_cast<float*>(counters.ptr[i]);
      *c += 1.0f;
      step = static_cast<T>(*c);
      if (sr_steps != nullptr) (*sr_steps)[i] = optim::sr_step_key(*c);
    }
    out[i] = optim::adam_step_scalars(h, h.lr_exact, step);
  }
  return out;
}

void fused_adam_cpu(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs,
                    const TensorRefs& exp_avg_sqs, const TensorRefs& max_exp_avg_sqs, const TensorRefs& state_steps,
                    double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay,
                    double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const BF16Modes& modes = {}) {
  constexpr const char* op = "fastreg::_fused_adam_";
  std::vector<std::pair<const char*, TensorRefs>> lists = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  std::vector<bool> written = {true, false, true, true};
  if (amsgrad) {
    lists.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
    written.push_back(true);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": amsgrad is off so max_exp_avg_sqs must be empty");
  }
  const int64_t master_list = append_master_list(modes, lists, written);
  FlatGroup group(op, lists, written, master_list);
  check_modes(op, modes, group.dtype());
  const Counters counters =
      counter_pointers(op, "state_steps", state_steps, group.num_tensors(), {at::kFloat, at::kDouble});
  const CommonArgs args = read_common_args(op, lr, lr_tensor, grad_scale, found_inf);
  if (args.skip) return;

  const int64_t slots[5] = {0, 1, 2, 3, amsgrad ? 4 : -1};
  constexpr bool kWritten[5] = {true, false, true, true, true};
  with_math_type(group.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const auto h = optim::make_adam_hyper<T>(args.lr, beta1, beta2, weight_decay, eps, args.inv_grad_scale, maximize,
                                              decoupled_weight_decay);
    std::vector<uint32_t> sr_steps;
    const auto scalars = advance_steps(counters, h, modes.stochastic() ? &sr_steps : nullptr);
    auto span = [&](int64_t i, T* const* a, int64_t k) { adam_span(a[0], a[1], a[2], a[3], a[4], k, h, scalars[i]); };
    if constexpr (std::is_same_v<T, float>) {
      if (modes.stochastic() || modes.has_master()) {
        run_pieces_modes(group, slots, kWritten, modes, master_list, sr_steps, span);
        return;
      }
    }
    run_pieces<T>(group, slots, kWritten, span);
  });
  group.finish();
}

// ADInplaceOrView kernel of both operators: after the update, bumps the version counter of every
// parameter (the first argument), as ATen's in-place ops do, so that autograd notices a graph that
// saved a parameter before the step. The state tensors are the optimizer's own and no graph sees
// them; leaving their counters alone saves a cache miss per tensor, which is most of the cost of a
// call with thousands of small tensors.
void bump_versions_after(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  const c10::IValue params = (*stack)[stack->size() - n];  // a reference to the list, no tensor copies
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const c10::IValue& t : params.toListRef()) torch::autograd::increment_version(t.toTensor());
}

// ---- dispatcher entry points (boxed: the tensor lists are read in place from the stack) ------

std::optional<at::Tensor> optional_tensor(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<at::Tensor>(v.toTensor());
}

void fused_sgd_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 16;
  const auto a = torch::jit::last(*stack, kArgs);
  const TensorRefs sr_steps(a[14]), master(a[15]);
  BF16Modes modes;
  modes.sr_seed = a[13].toInt();
  modes.sr_steps = &sr_steps;
  modes.master = &master;
  fused_sgd_cpu(TensorRefs(a[0]), TensorRefs(a[1]), TensorRefs(a[2]), TensorRefs(a[3]), a[4].toDouble(),
                optional_tensor(a[5]), a[6].toDouble(), a[7].toDouble(), a[8].toDouble(), a[9].toBool(),
                a[10].toBool(), optional_tensor(a[11]), optional_tensor(a[12]), modes);
  torch::jit::drop(*stack, kArgs);
}

void fused_adam_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 19;
  const auto a = torch::jit::last(*stack, kArgs);
  const TensorRefs master(a[18]);
  BF16Modes modes;
  modes.sr_seed = a[17].toInt();
  modes.master = &master;
  fused_adam_cpu(TensorRefs(a[0]), TensorRefs(a[1]), TensorRefs(a[2]), TensorRefs(a[3]), TensorRefs(a[4]),
                 TensorRefs(a[5]), a[6].toDouble(), optional_tensor(a[7]), a[8].toDouble(), a[9].toDouble(),
                 a[10].toDouble(), a[11].toDouble(), a[12].toBool(), a[13].toBool(), a[14].toBool(),
                 optional_tensor(a[15]), optional_tensor(a[16]), modes);
  torch::jit::drop(*stack, kArgs);
}

// Sparse gradients reach this instead of the dense kernels (the dispatcher picks the sparse key
// when any argument is sparse): fail with a clear message.
void sparse_unsupported(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " does not support sparse gradients (torch.optim.SparseAdam does)");
}

// Autograd kernel of both operators: the update is not differentiable and, like torch.optim's fused
// kernels, runs under no_grad, where it simply goes on to the in-place/backend kernels (without the
// generic fallback's walk over every tensor). With grad mode on, parameters that require grad are
// refused, as ATen refuses in-place updates of leaves that require grad.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    const TensorRefs params((*stack)[stack->size() - n]);
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(!params[i].requires_grad(), op.schema().name(), ": params[", i,
                  "] requires grad and grad mode is on; run the optimizer update under torch.no_grad()");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace optim_cpu

// Which CPU code the kernels run, picked at load time (fastreg._C.cpu_code_path(): the build
// report and benchmark provenance) -- "<arch>-<vector ISA>", plus "-serial" for a build without
// OpenMP (at::parallel_for then runs on one thread).
std::string cpu_code_path() {
#if defined(FASTREG_X86_ISAS)
  using optim_cpu::X86Isa;
  const X86Isa isa = optim_cpu::x86_isa();
  std::string path = isa == X86Isa::kAvx512 ? "x86_64-avx512f" : isa == X86Isa::kAvx2 ? "x86_64-avx2" : "x86_64-sse2";
#elif defined(FASTREG_NEON)
  std::string path = "aarch64-neon";
#else
  std::string path = "generic";
#endif
#if !defined(_OPENMP)
  path += "-serial";
#endif
  return path;
}

}  // namespace fastreg

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::fused_sgd_boxed>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::fused_adam_boxed>());
}

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::below_autograd>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::below_autograd>());
}

// The parameters are updated in place: bump their version counters (autograd then notices a graph
// that saved a parameter before the step), for every backend.
TORCH_LIBRARY_IMPL(fastreg, ADInplaceOrView, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::bump_versions_after>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::bump_versions_after>());
}

TORCH_LIBRARY_IMPL(fastreg, SparseCPU, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::sparse_unsupported>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::sparse_unsupported>());
}

TORCH_LIBRARY_IMPL(fastreg, SparseCUDA, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::sparse_unsupported>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::sparse_unsupported>());
}
