// CUDA launchers of the ppo_policy_loss kernels, on raw pointers and a stream. Plain C++ (no torch
// headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/ppo_loss_params.h"

namespace fastrlhf::cuda {

// One block per row: the row's sums and valid-token count. Returns the launch error, if any.
cudaError_t launch_ppo_loss_forward(const PPOLossForwardParams& p, cudaStream_t stream);

// Elementwise, grid-stride. sm_count: multiprocessors of the device.
cudaError_t launch_ppo_loss_backward(const PPOLossBackwardParams& p, int sm_count, cudaStream_t stream);

}  // namespace fastrlhf::cuda
