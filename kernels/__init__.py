"""Kernels and their host launchers (installed as ``otfast.kernels``): no autograd, no policy."""
