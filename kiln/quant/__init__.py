"""Quantization: compute types, integer weights and the int8 kernels (CPU and Triton)."""
