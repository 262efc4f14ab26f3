// Typed dispatcher entries of the TORCH_LIBRARY ops for the Python wrappers (direct_calls.cpp).
#pragma once

#include <torch/extension.h>

namespace fastrlhf {

// Defines one function per op on the extension module, named as the op: `_C.gae(...)` calls
// fastrlhf::gae through the dispatcher, exactly as `torch.ops.fastrlhf.gae(...)` does.
void define_direct_calls(pybind11::module_& m);

}  // namespace fastrlhf
