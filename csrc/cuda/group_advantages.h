// CUDA launcher of the group_advantages kernels, on raw pointers and a stream. Plain C++ (no torch
// headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/group_advantages_params.h"

namespace fastrlhf::cuda {

// One block per row (rows up to 2^31 - 1). Returns the launch error, if any.
cudaError_t launch_group_advantages_forward(const GroupAdvantagesParams& p, cudaStream_t stream);

}  // namespace fastrlhf::cuda
