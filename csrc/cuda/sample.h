// CUDA launcher of the sample kernel, on raw pointers and a stream. Plain C++ (no torch headers) so
// that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/sample_params.h"

namespace fastrlhf::cuda {

// One block per row (a grid-stride loop past 2^31 - 1 rows); needs no workspace and is deterministic.
// Returns the launch error, if any.
cudaError_t launch_sample(const SampleParams& p, cudaStream_t stream);

}  // namespace fastrlhf::cuda
