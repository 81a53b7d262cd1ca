// The emulation's stand-in for c10/cuda/CUDAException.h (csrc/emulation): a failed call or launch
// on the emulated device raises, with the emulation's description of what went wrong (a deadlock,
// threads at different barriers, ...).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>

namespace fastopt_emu {
std::string last_error_message();
}

#define C10_CUDA_CHECK(EXPR)                                                                              \
  do {                                                                                                    \
    const cudaError_t fastopt_emu_error = (EXPR);                                                         \
    TORCH_CHECK(fastopt_emu_error == cudaSuccess, "CUDA error (emulated device): ",                       \
                cudaGetErrorString(fastopt_emu_error), ": ", ::fastopt_emu::last_error_message());         \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
