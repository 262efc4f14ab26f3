"""Triton kernels of fastrlhf.

Each module holds the kernels of one op plus thin host wrappers that pick block sizes and launch them.
They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported.
Importing this package does not import triton; import the op modules (e.g. ``gather_logprobs``) directly.
"""
