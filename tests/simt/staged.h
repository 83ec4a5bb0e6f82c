// A host buffer staged into a guarded allocation of the SIMT runtime for one launch (same address
// mod 16, so the kernels take the same aligned or misaligned path), checked and copied back.
#pragma once
#include <cstring>

#include "simt.h"

namespace simt_harness {

class Staged {
 public:
  Staged(const void* host, size_t bytes, bool written, const char* name)
      : host_(const_cast<void*>(host)), bytes_(bytes), written_(written) {
    if (host_ == nullptr) return;
    dev_ = simt::guarded_alloc(bytes, reinterpret_cast<uintptr_t>(host) % 16, name);
    if (bytes) std::memcpy(dev_, host, bytes);
  }
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  ~Staged() {
    if (dev_ != nullptr) {
      try {
        simt::guarded_free(dev_);
      } catch (...) {
      }
    }
  }
  void* device() const { return dev_; }
  // Copies the result back (written buffers) and checks the canaries (throws on damage).
  void finish() {
    if (dev_ == nullptr) return;
    if (written_ && bytes_) std::memcpy(host_, dev_, bytes_);
    void* d = dev_;
    dev_ = nullptr;
    simt::guarded_free(d);
  }

 private:
  void* host_;
  void* dev_ = nullptr;
  size_t bytes_;
  bool written_;
};

}  // namespace simt_harness
