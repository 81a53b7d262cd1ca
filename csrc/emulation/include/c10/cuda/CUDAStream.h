// The emulation's stand-in for c10/cuda/CUDAStream.h (csrc/emulation): host_runtime.cpp built for CPU
// tensors on the host emulation of the device. One in-order stream per thread (launches complete
// before they return); setCurrentCUDAStream / CUDAStreamGuard switch the handle that tables are
// keyed by.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {

class CUDAStream {
 public:
  explicit CUDAStream(cudaStream_t stream = nullptr) : stream_(stream) {}
  cudaStream_t stream() const { return stream_; }
  operator cudaStream_t() const { return stream_; }
  c10::DeviceIndex device_index() const { return 0; }
  c10::Device device() const { return c10::Device(c10::DeviceType::CPU); }
  c10::StreamId id() const { return static_cast<c10::StreamId>(reinterpret_cast<intptr_t>(stream_)); }
  c10::Stream unwrap() const { return c10::Stream(c10::Stream::UNSAFE, device(), id()); }
  operator c10::Stream() const { return unwrap(); }
  void synchronize() const {}
  bool query() const { return true; }
  bool operator==(const CUDAStream& other) const { return stream_ == other.stream_; }
  bool operator!=(const CUDAStream& other) const { return stream_ != other.stream_; }

 private:
  cudaStream_t stream_;
};

namespace detail {
inline CUDAStream& current_stream() {
  thread_local CUDAStream stream;
  return stream;
}
}  // namespace detail

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return detail::current_stream(); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline void setCurrentCUDAStream(CUDAStream stream) { detail::current_stream() = stream; }

class CUDAStreamGuard {
 public:
  explicit CUDAStreamGuard(CUDAStream stream) : previous_(getCurrentCUDAStream()) { setCurrentCUDAStream(stream); }
  ~CUDAStreamGuard() { setCurrentCUDAStream(previous_); }
  CUDAStreamGuard(const CUDAStreamGuard&) = delete;
  CUDAStreamGuard& operator=(const CUDAStreamGuard&) = delete;

 private:
  CUDAStream previous_;
};

}  // namespace c10::cuda
