// The Python module `fastreg._C` (pybind11): build and runtime facts about this binary.
//
// Importing the module loads the shared library, whose static initialisers register the operators
// (TORCH_LIBRARY in csrc/fastreg.cpp); the functions here only describe the build:
//   fastreg version, torch version of the headers it was compiled against, CUDA archs compiled,
//   whether CUDA kernels are present, the CPU code path the kernels picked at load
//   (fastreg::cpu_code_path, csrc/optim/optim_cpu.cpp), OpenMP threads; and the controls of the
//   large-CPU-buffer cache (csrc/mem/cpu_buffers.h, fastreg/memory.py).
// fastreg/_C_loader.py compares the torch version with the running torch and refuses a mismatch;
// `python -m fastreg` prints the whole report.
//
// Build-time facts arrive as macros from setup.py: FASTREG_VERSION (fastreg/_version.py) and,
// for CUDA builds, FASTREG_WITH_CUDA and FASTREG_CUDA_ARCHS ('_'-separated, e.g. 80_90).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <torch/headeronly/version.h>

#include <map>
#include <string>
#include <vector>

#include "common.h"
#include "mem/cpu_buffers.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define FASTREG_STR_(...) #__VA_ARGS__
#define FASTREG_STR(...) FASTREG_STR_(__VA_ARGS__)

#ifndef FASTREG_VERSION
#error "FASTREG_VERSION is defined by setup.py (from fastreg/_version.py)"
#endif

namespace {

std::string torch_version_built() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

bool cuda_kernels_compiled() {
#ifdef FASTREG_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Real-code (SASS) architectures, e.g. {"sm_80", "sm_90"}; setup.py also embeds PTX of the last.
std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
#if defined(FASTREG_WITH_CUDA) && defined(FASTREG_CUDA_ARCHS)
  const std::string list = FASTREG_STR(FASTREG_CUDA_ARCHS);
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find('_', start);
    if (end == std::string::npos) end = list.size();
    std::string cap = list.substr(start, end - start);
    if (!cap.empty()) archs.push_back("sm_" + cap);
    start = end + 1;
  }
#endif
  return archs;
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

// The same facts as plain text in the binary, for when it cannot be loaded at all (a torch with
// another ABI: undefined symbols): fastreg/_C_loader.py then reads them from the file to say which
// torch it was built against.
extern "C" __attribute__((used, visibility("default"))) const char fastreg_build_stamp[] =
    "fastreg-build-stamp: fastreg=" FASTREG_STR(FASTREG_VERSION) " torch=" FASTREG_STR(TORCH_VERSION_MAJOR) "." FASTREG_STR(
        TORCH_VERSION_MINOR) "." FASTREG_STR(TORCH_VERSION_PATCH) ";";

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastreg's compiled library: operators in torch.ops.fastreg, build facts here";
  m.def("version", [] { return std::string(FASTREG_STR(FASTREG_VERSION)); }, "fastreg version this binary was built as");
  m.def("torch_version", &torch_version_built, "torch version (major.minor.patch) of the headers it was compiled against");
  m.def("cuda_kernels_compiled", &cuda_kernels_compiled, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled to real code, e.g. ['sm_80', 'sm_90']");
  m.def("cpu_code_path", &fastreg::cpu_code_path,
        "CPU code the kernels picked at load, e.g. x86_64-avx512f, x86_64-avx2, x86_64-sse2, aarch64-neon "
        "('-serial' without OpenMP)");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the CPU kernels were built with OpenMP");
  m.def(
      "cpu_cache_info",
      [] {
        const auto i = fastreg::cpu_buffers::info();
        return std::map<std::string, int64_t>{{"cached_bytes", i.cached_bytes}, {"limit_bytes", i.limit_bytes},
                                              {"live_bytes", i.live_bytes}, {"hits", i.hits}, {"misses", i.misses}};
      },
      "the cache of large CPU buffers (csrc/mem/cpu_buffers.h): bytes cached, limit, bytes in use, hits, misses");
  m.def("cpu_cache_release", &fastreg::cpu_buffers::release, "return every cached CPU buffer block to the system");
  m.def("cpu_cache_set_limit", &fastreg::cpu_buffers::set_limit, "bytes the CPU buffer cache may hold");
  m.def("openmp_threads", &openmp_threads, "OpenMP threads the CPU kernels use (omp_get_max_threads)");
}
