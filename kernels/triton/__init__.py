"""Fused Triton Sinkhorn kernels (forward and backward) and their launchers."""
