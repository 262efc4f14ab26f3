// Element type of the 16/32-bit floating tensors the kernels read (logits, logprobs), shared by every
// op's params, the CPU kernels, the CUDA launchers and the torch glue. Plain C++17, no torch headers.
#pragma once

namespace fastrlhf {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fastrlhf
