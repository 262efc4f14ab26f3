// CUDA launchers of the gather_logprobs kernels, on raw pointers and a stream. Plain C++ (no torch
// headers) so that the .cu compiles with nvcc alone; csrc/cuda/bindings.cpp is the torch side.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/gather_logprobs_params.h"  // DType (the logits dtype enum) and the params structs

namespace fastrlhf::cuda {

// How the forward maps rows to thread blocks. With enough rows, one block per row. With few rows
// and a long vocab, each row is split into `chunks` blocks that write partial softmax states to a
// caller-provided workspace of `workspace_bytes`, merged by a second small kernel.
struct ForwardPlan {
  int64_t chunks;
  int64_t chunk_len;  // elements per chunk (the whole row when chunks == 1)
  size_t workspace_bytes;
};

// sm_count: multiprocessors of the device the kernels will run on.
ForwardPlan plan_gather_logprobs_forward(int64_t n_rows, int64_t vocab, int sm_count);

// Returns the launch error, if any (cudaErrorInvalidValue for shapes the grid can't hold).
cudaError_t launch_gather_logprobs_forward(const GatherLogprobsForwardParams& p, const ForwardPlan& plan,
                                           void* workspace, cudaStream_t stream);

// Elementwise over (row, V-chunk) tasks; needs no workspace. dlogits may alias logits.
cudaError_t launch_gather_logprobs_backward(const GatherLogprobsBackwardParams& p, int sm_count,
                                            cudaStream_t stream);

}  // namespace fastrlhf::cuda
