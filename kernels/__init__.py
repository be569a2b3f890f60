"""The engine (installed as ``otfast.kernels``): Triton kernels with their shipped configurations, and the C++
CPU kernel. No torch-level logic and no import of the rest of ``otfast``: the launchers that check shapes,
prepare the points and choose configurations are ``otfast.triton_backend`` and ``otfast.cpu_backend``.
"""
