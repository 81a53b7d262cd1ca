// csrc/cuda/updates.cu, compiled unchanged as C++ for the host emulation of the device (see README.md).
#include "cuda_emulation.h"

#include "cuda/updates.cu"
