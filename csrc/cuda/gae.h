// CUDA launchers of the gae and advantages kernels, on raw pointers and a stream. Plain C++ (no
// torch headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/gae_params.h"

namespace fastrlhf::cuda {

// One block per row (rows up to 2^31 - 1). Returns the launch error, if any.
cudaError_t launch_gae_forward(const GaeParams& p, cudaStream_t stream);
cudaError_t launch_advantages_forward(const AdvantagesParams& p, cudaStream_t stream);

}  // namespace fastrlhf::cuda
