// The fused optimizers' vectorised update loops on plain arrays, for callers that own their
// tensors' memory and step in a tight C++ loop (csrc/fit/fit.cpp). Defined in
// csrc/optim/optim_cpu.cpp next to the loops the optimizer operators use, so that fit() and
// optimizer.step() run the very same code (same ISA pick, same rounding).
#pragma once
#include <cstdint>

#include "optim/optim_math.h"

namespace fastreg {
namespace optim_cpu {

// p, grad, m, v (and vmax with amsgrad, else nullptr): n elements each.
void adam_span_for_fit(float* p, const float* g, float* m, float* v, float* vmax, int64_t n,
                       const optim::AdamHyper<float>& h, const optim::AdamStepScalars<float>& s);
void adam_span_for_fit(double* p, const double* g, double* m, double* v, double* vmax, int64_t n,
                       const optim::AdamHyper<double>& h, const optim::AdamStepScalars<double>& s);
// buf == nullptr: no momentum. first: the momentum buffer holds no value yet.
void sgd_span_for_fit(float* p, const float* g, float* buf, int64_t n, bool first, const optim::SgdHyper<float>& h);
void sgd_span_for_fit(double* p, const double* g, double* buf, int64_t n, bool first,
                      const optim::SgdHyper<double>& h);

}  // namespace optim_cpu
}  // namespace fastreg
