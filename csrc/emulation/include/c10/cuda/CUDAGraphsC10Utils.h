// The emulation's stand-in for c10/cuda/CUDAGraphsC10Utils.h (csrc/emulation): nothing is ever
// captured on the host.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAStream.h>

namespace c10::cuda {

enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };

inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }

struct CUDAStreamCaptureModeGuard {
  explicit CUDAStreamCaptureModeGuard(cudaStreamCaptureMode) {}
  CUDAStreamCaptureModeGuard(const CUDAStreamCaptureModeGuard&) = delete;
  CUDAStreamCaptureModeGuard& operator=(const CUDAStreamCaptureModeGuard&) = delete;
};

}  // namespace c10::cuda
