"""The fused C++ CPU Sinkhorn kernel, bound with pybind11."""
