// CUDA launcher of the kl_penalty kernels, on raw pointers and a stream. Plain C++ (no torch
// headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/kl_penalty_params.h"

namespace fastrlhf::cuda {

// Forward when p.grad is null (out = kl), backward otherwise (out = grad * d kl / d logprobs).
// sm_count: multiprocessors of the device. Returns the launch error, if any.
cudaError_t launch_kl_penalty(const KLPenaltyParams& p, int sm_count, cudaStream_t stream);

}  // namespace fastrlhf::cuda
