"""The configurations the Triton kernels ship with: block sizes, warps and compile options.

The launchers (``otfast.triton_backend``) choose among these and nothing else, and the sm_90 resource
check (``python -m otfast.kernels.triton.resources``) compiles every one of them; both import this module.
"""

RESIDENT_MAX = 32  # the resident kernel's square tile; longer pairs stream (64 x 64 spills, see the README)
RESIDENT_WARPS = 4  # at 8 warps one of the eight variants spills 48 bytes
PRECISIONS = ("ieee", "tf32x3")  # tl.dot precision of S @ y in the backward; plain tf32 is too coarse
STREAM_BLOCK = 32
STREAM_WARPS = 4
COST_BLOCK = (64, 64, 16)  # BLOCK_N, BLOCK_M, BLOCK_K
COST_WARPS = 4
GRAD_BLOCK = (64, 32, 16, 64)  # BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_DO
GRAD_WARPS = 8
# No software pipelining: prefetched tiles would stay live in registers and spill; the kernels are
# exp-bound, not load-latency bound.
NUM_STAGES = 1
# Fused multiply-adds on (triton's default, named so that triton >= 3.9 does not warn that its default will
# change): the kernels' error-free subtractions (TwoSum) contain no products to fuse, and the exponent
# -u k + w is better rounded once.
FP_FUSION = True


def configs() -> list[tuple[str, dict, int]]:
    """Every (kernel, constexprs, num_warps) a launcher can choose (all with ``NUM_STAGES`` and ``FP_FUSION``)."""
    out = []
    for from_points in (True, False):
        for symmetric in (False, True):
            for has_tol in (False, True):
                out.append(("_sinkhorn_resident_kernel", dict(BLOCK_N=RESIDENT_MAX, BLOCK_M=RESIDENT_MAX,
                            FROM_POINTS=from_points, SYMMETRIC=symmetric, HAS_TOL=has_tol), RESIDENT_WARPS))
    for symmetric in (False, True):
        for has_tol in (False, True):
            out.append(("_sinkhorn_streaming_kernel", dict(BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK,
                        SYMMETRIC=symmetric, HAS_TOL=has_tol), STREAM_WARPS))
    bn, bm, bk = COST_BLOCK
    out.append(("_cost_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk), COST_WARPS))
    bn, bm, bk, bdo = GRAD_BLOCK
    for precision in PRECISIONS:
        out.append(("_grad_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=precision),
                    GRAD_WARPS))
    return out
