"""Triton kernels, each beside its eager PyTorch reference with the same signature."""
