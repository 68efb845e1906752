"""Triton kernels for the sparse engine, each beside the PyTorch reference it must match.

On CUDA tensors the kernels are compiled; on CPU tensors they run under Triton's
interpreter when TRITON_INTERPRET=1 was set before Triton was imported (the test suite
does so on machines without a GPU), and raise otherwise (see `launch`).
"""
