// CPU kernels of fastreg's fused optimizers: fastreg::_fused_sgd_ and fastreg::_fused_adam_
// (schemas in csrc/fastreg.cpp, update rules in optim_math.h, Python API in fastreg/optim/).
//
// One call updates every tensor of one (device, dtype) group. The elements of all the tensors are
// laid end to end and cut into equal runs for at::parallel_for, so one parallel region covers the
// whole group whatever the mix of tensor sizes (no per-tensor dispatch, no per-tensor region). A
// run is processed tensor piece by tensor piece with vectorised loops over plain float/double
// arrays; bf16/fp16 tensors go through small float staging buffers (math in fp32, one rounding on
// store).
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
#include "optim/optim_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FASTREG_X86_ISAS 1
#endif

namespace fastreg {
namespace optim_cpu {

using optim::AdamHyper;
using optim::AdamStepScalars;
using optim::SgdHyper;

// ================================================================================================
// Vectorised loops over plain arrays.
//
// SGD: plain `omp simd` loops over the scalar update rule; GCC vectorises them in each of the
// AVX-512 / AVX2 / baseline clones that target_clones makes of the entry points (picked at load
// time: the binary still runs on a CPU without AVX).
//
// Adam: the same would not vectorise, because the build compiles with -fmath-errno, which makes
// every sqrt a call that may set errno. So the Adam loops run the update rule on explicit SIMD
// vectors (GCC vector types: + - * / and selects are portable, only sqrt is an ISA instruction),
// in one function per ISA, with the scalar rule for the tail; the ISA is picked once at load time.
// ================================================================================================

#define FASTREG_INLINE inline __attribute__((always_inline))
#if defined(FASTREG_X86_ISAS)
#define FASTREG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_CLONES
#endif

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
  static T apply(T x) {
    return optim::math_sqrt(x);
  }
};

// Adam over n elements: SIMD vectors of type V (lanes of T) with Sqrt::apply(V), then the scalar
// rule for the remaining n % lanes elements.
template <bool AMSGRAD, typename V, typename Sqrt, typename T>
inline void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                              T* __restrict vmax, int64_t n, const AdamHyper<T> h, const AdamStepScalars<T> s) {
  constexpr int64_t kLanes = static_cast<int64_t>(sizeof(V) / sizeof(T));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V pi = loadu<V>(p + i), mi = loadu<V>(m + i), vi = loadu<V>(v + i);
    V vmi = AMSGRAD ? loadu<V>(vmax + i) : V{};
    const V second = optim::adam_moments<AMSGRAD>(pi, loadu<V>(g + i), mi, vi, vmi, h);
    storeu(p + i, optim::adam_apply(pi, mi, Sqrt::apply(second), h, s));
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
  FASTREG_AVX512 static inline vf16 apply(vf16 x) { return (vf16)_mm512_maskz_sqrt_ps(0xFFFF, (__m512)x); }
  FASTREG_AVX512 static inline vd8 apply(vd8 x) { return (vd8)_mm512_maskz_sqrt_pd(0xFF, (__m512d)x); }
};
struct Avx2Sqrt {
  FASTREG_AVX2 static inline vf8 apply(vf8 x) { return (vf8)_mm256_sqrt_ps((__m256)x); }
  FASTREG_AVX2 static inline vd4 apply(vd4 x) { return (vd4)_mm256_sqrt_pd((__m256d)x); }
};
struct Sse2Sqrt {  // SSE2 is part of x86-64 itself
  static inline vf4 apply(vf4 x) { return (vf4)_mm_sqrt_ps((__m128)x); }
  static inline vd2 apply(vd2 x) { return (vd2)_mm_sqrt_pd((__m128d)x); }
};

FASTREG_ADAM_ISA(adam_avx512, FASTREG_AVX512, vf16, vd8, Avx512Sqrt)
FASTREG_ADAM_ISA(adam_avx2, FASTREG_AVX2, vf8, vd4, Avx2Sqrt)
FASTREG_ADAM_ISA(adam_sse2, , vf4, vd2, Sse2Sqrt)

template <typename T>
AdamSpanFn<T> pick_adam_span(AdamSpanFn<T> avx512, AdamSpanFn<T> avx2, AdamSpanFn<T> sse2) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return avx512;
  if (__builtin_cpu_supports("avx2")) return avx2;
  return sse2;
}
const AdamSpanFn<float> adam_f32 = pick_adam_span<float>(adam_avx512_f32, adam_avx2_f32, adam_sse2_f32);
const AdamSpanFn<double> adam_f64 = pick_adam_span<double>(adam_avx512_f64, adam_avx2_f64, adam_sse2_f64);
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

// bf16 / fp16: stage kStage elements at a time in float buffers, run the fp32 loop, round back.
constexpr int64_t kStage = 256;

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

// The tensors of one dtype group, list by list (params, grads, state...), checked and flattened.
// Each tensor set (params[i], grads[i], states[i]...) is processed as one flat array of
// params[i].numel() elements: directly when the tensors share one dense layout, else through
// contiguous temporaries that are copied back by finish().
class FlatGroup {
 public:
  FlatGroup(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists,
            const std::vector<bool>& written)
      : num_lists_(static_cast<int64_t>(lists.size())) {
    const at::TensorList params = lists[0].second;
    num_tensors_ = static_cast<int64_t>(params.size());
    TORCH_CHECK(num_tensors_ > 0, op, ": the params list is empty");
    for (const auto& [name, list] : lists) {
      TORCH_CHECK(static_cast<int64_t>(list.size()) == num_tensors_, op, ": ", name, " has ", list.size(),
                  " tensors but params has ", num_tensors_);
    }
    dtype_ = params[0].scalar_type();
    TORCH_CHECK(is_float_dtype(dtype_), op, ": params must be float32, float64, bfloat16 or float16, got ", dtype_);
    ptrs_.resize(num_tensors_ * num_lists_);
    offsets_.resize(num_tensors_ + 1, 0);
    for (int64_t i = 0; i < num_tensors_; ++i) {
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
        TORCH_CHECK(t.scalar_type() == dtype_, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                    " but params has ", dtype_, " (one call takes tensors of one dtype)");
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
  template <typename F>
  void for_each_piece(F f) const {
    const int64_t total = offsets_.back();
    constexpr int64_t kGrain = 32768;
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = std::upper_bound(offsets_.begin(), offsets_.end(), begin) - offsets_.begin() - 1;
      while (begin < end) {
        const int64_t stop = std::min(end, offsets_[i + 1]);
        if (stop > begin) f(i, begin - offsets_[i], stop - begin);
        begin = stop;
        ++i;
      }
    });
  }

  // Copies the results held in contiguous temporaries back into their strided tensors.
  void finish() {
    for (auto& [dst, src] : writeback_) dst.copy_(src);
  }

 private:
  int64_t num_lists_;
  int64_t num_tensors_ = 0;
  at::ScalarType dtype_ = at::kFloat;
  std::vector<char*> ptrs_;
  std::vector<int64_t> offsets_;
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

// Checks a list of one-element per-tensor counters/flags (state_steps, momentum flags).
void check_counters(const char* op, const char* name, at::TensorList list, int64_t n,
                    std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", name, " has ", list.size(),
              " tensors but params has ", n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, "[", i, "] must be a one-element tensor");
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), " but the params are on cpu");
    TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end(), op, ": ", name, "[", i,
                "] has unsupported dtype ", t.scalar_type());
  }
}

// ================================================================================================
// SGD
// ================================================================================================

template <typename T>
SgdHyper<T> make_sgd_hyper(const CommonArgs& a, double momentum, double dampening, double weight_decay,
                           bool nesterov, bool maximize) {
  SgdHyper<T> h;
  h.neg_lr = static_cast<T>(-a.lr);
  h.momentum = static_cast<T>(momentum);
  h.one_minus_dampening = static_cast<T>(1.0 - dampening);
  h.weight_decay = static_cast<T>(weight_decay);
  h.inv_grad_scale = static_cast<T>(a.inv_grad_scale);
  h.nesterov = nesterov;
  h.maximize = maximize;
  return h;
}

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList momentum_started, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fastreg::_fused_sgd_";
  const bool use_momentum = momentum != 0.0;
  std::vector<std::pair<const char*, at::TensorList>> lists = {{"params", params}, {"grads", grads}};
  std::vector<bool> written = {true, false};
  if (use_momentum) {
    lists.emplace_back("momentum_buffers", momentum_buffers);
    written.push_back(true);
    check_counters(op, "momentum_started", momentum_started, static_cast<int64_t>(params.size()), {at::kByte, at::kBool});
  } else {
    TORCH_CHECK(momentum_buffers.empty() && momentum_started.empty(), op,
                ": momentum is 0 so momentum_buffers and momentum_started must be empty");
  }
  FlatGroup group(op, lists, written);
  const CommonArgs args = read_common_args(op, lr, lr_tensor, grad_scale, found_inf);
  if (args.skip) return;

  const int64_t n = group.num_tensors();
  // first[i]: the momentum buffer of tensor i has never been written (torch's `buf is None`).
  std::vector<uint8_t> first(n, 0);
  if (use_momentum) {
    for (int64_t i = 0; i < n; ++i) {
      uint8_t* flag = static_cast<uint8_t*>(momentum_started[i].data_ptr());
      first[i] = *flag == 0;
      *flag = 1;
    }
  }
  const int64_t slots[3] = {0, 1, use_momentum ? 2 : -1};
  constexpr bool kWritten[3] = {true, false, true};
  with_math_type(group.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const auto h = make_sgd_hyper<T>(args, momentum, dampening, weight_decay, nesterov, maximize);
    run_pieces<T>(group, slots, kWritten, [&](int64_t i, T* const* a, int64_t k) {
      sgd_span(a[0], a[1], a[2], k, first[i], h);
    });
  });
  group.finish();
}

// ================================================================================================
// Adam / AdamW
// ================================================================================================

template <typename T>
AdamHyper<T> make_adam_hyper(const CommonArgs& a, double beta1, double beta2, double weight_decay, double eps,
                             bool maximize, bool decoupled) {
  AdamHyper<T> h;
  h.lr = static_cast<T>(a.lr);
  h.beta1 = static_cast<T>(beta1);
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  h.eps = static_cast<T>(eps);
  h.weight_decay = static_cast<T>(weight_decay);
  h.inv_grad_scale = static_cast<T>(a.inv_grad_scale);
  h.decoupled = decoupled;
  h.maximize = maximize;
  return h;
}

// Increments every step counter (in its own dtype, like torch's `step += 1`) and returns the
// per-tensor scalars that follow from the new count.
template <typename T>
std::vector<AdamStepScalars<T>> advance_steps(at::TensorList state_steps, const AdamHyper<T>& h) {
  std::vector<AdamStepScalars<T>> out(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    T step;
    if (s.scalar_type() == at::kFloat) {
      float* c = s.data_ptr<float>();
      *c += 1.0f;
      step = static_cast<T>(*c);
    } else {
      double* c = s.data_ptr<double>();
      *c += 1.0;
      step = static_cast<T>(*c);
    }
    out[i] = optim::adam_step_scalars(h, h.lr, step);
  }
  return out;
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay,
                    double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fastreg::_fused_adam_";
  std::vector<std::pair<const char*, at::TensorList>> lists = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  std::vector<bool> written = {true, false, true, true};
  if (amsgrad) {
    lists.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
    written.push_back(true);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": amsgrad is off so max_exp_avg_sqs must be empty");
  }
  FlatGroup group(op, lists, written);
  check_counters(op, "state_steps", state_steps, group.num_tensors(), {at::kFloat, at::kDouble});
  const CommonArgs args = read_common_args(op, lr, lr_tensor, grad_scale, found_inf);
  if (args.skip) return;

  const int64_t slots[5] = {0, 1, 2, 3, amsgrad ? 4 : -1};
  constexpr bool kWritten[5] = {true, false, true, true, true};
  with_math_type(group.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const auto h = make_adam_hyper<T>(args, beta1, beta2, weight_decay, eps, maximize, decoupled_weight_decay);
    const auto scalars = advance_steps(state_steps, h);
    run_pieces<T>(group, slots, kWritten, [&](int64_t i, T* const* a, int64_t k) {
      adam_span(a[0], a[1], a[2], a[3], a[4], k, h, scalars[i]);
    });
  });
  group.finish();
}

// ADInplaceOrView kernel of both operators: after the update, bumps the version counter of every
// tensor in a mutated (Tensor(a!)[]) argument, as ATen's in-place ops do, so that autograd notices
// a graph that saved a parameter before the step.
void bump_versions_after(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  std::vector<c10::IValue> mutated;  // the mutated list arguments (a reference each, no tensor copies)
  for (size_t i = 0; i < n; ++i) {
    const c10::AliasInfo* alias = schema.arguments()[i].alias_info();
    if (alias != nullptr && alias->isWrite()) mutated.push_back((*stack)[stack->size() - n + i]);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const c10::IValue& arg : mutated) {
    if (arg.isTensorList()) {
      for (const c10::IValue& t : arg.toListRef()) torch::autograd::increment_version(t.toTensor());
    } else if (arg.isTensor()) {
      torch::autograd::increment_version(arg.toTensor());
    }
  }
}

// Sparse gradients reach these instead of the dense kernels (the dispatcher picks the sparse key
// when any argument is sparse): fail with a clear message.
void fused_sgd_sparse(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                      const std::optional<at::Tensor>&, double, double, double, bool, bool,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fastreg::_fused_sgd_ does not support sparse gradients");
}

void fused_adam_sparse(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       at::TensorList, double, const std::optional<at::Tensor>&, double, double, double, double, bool,
                       bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fastreg::_fused_adam_ does not support sparse gradients, please consider torch.optim.SparseAdam");
}

}  // namespace optim_cpu
}  // namespace fastreg

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("_fused_sgd_", &fastreg::optim_cpu::fused_sgd_cpu);
  m.impl("_fused_adam_", &fastreg::optim_cpu::fused_adam_cpu);
}

// The parameters and state are updated in place: bump their version counters (autograd then
// notices a graph that saved a parameter before the step), for every backend.
TORCH_LIBRARY_IMPL(fastreg, ADInplaceOrView, m) {
  m.impl("_fused_sgd_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::bump_versions_after>());
  m.impl("_fused_adam_", torch::CppFunction::makeFromBoxedFunction<&fastreg::optim_cpu::bump_versions_after>());
}

TORCH_LIBRARY_IMPL(fastreg, SparseCPU, m) {
  m.impl("_fused_sgd_", &fastreg::optim_cpu::fused_sgd_sparse);
  m.impl("_fused_adam_", &fastreg::optim_cpu::fused_adam_sparse);
}

TORCH_LIBRARY_IMPL(fastreg, SparseCUDA, m) {
  m.impl("_fused_sgd_", &fastreg::optim_cpu::fused_sgd_sparse);
  m.impl("_fused_adam_", &fastreg::optim_cpu::fused_adam_sparse);
}
