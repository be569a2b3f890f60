"""Fused Triton Sinkhorn kernels (``sinkhorn``), the configurations they ship with (``configs``) and their sm_90
resource check (``python -m otfast.kernels.triton.resources``)."""
