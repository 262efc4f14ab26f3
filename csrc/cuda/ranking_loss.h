// CUDA launchers of the ranking_loss kernels, on raw pointers and a stream. Plain C++ (no torch
// headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include "common/ranking_loss_params.h"

namespace fastrlhf::cuda {

// One warp per prompt. Return the launch error, if any.
cudaError_t launch_ranking_loss_forward(const RankingLossForwardParams& p, cudaStream_t stream);
cudaError_t launch_ranking_loss_backward(const RankingLossBackwardParams& p, cudaStream_t stream);

}  // namespace fastrlhf::cuda
