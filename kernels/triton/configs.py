"""The configurations the Triton kernels ship with: block sizes, warps and compile options.

The launchers (``otfast.triton_backend``) choose among these and nothing else, and the sm_90 resource
check (``python -m otfast.kernels.triton.resources``) compiles every one of them; both import this module.
"""

import importlib.metadata
from typing import NamedTuple


def _triton_version() -> tuple[int, ...]:
    """The installed triton's (major, minor), or (0,) without triton."""
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


# The resident kernel's square tiles (side, num_warps, column groups, ANCHOR: ``_sinkhorn_resident_kernel``). A
# pair and problem takes the first whose side holds both of its lengths; longer pairs stream. The 64 tile reads the
# points only (from a precomputed cost, ``SYMMETRIC`` True or False, it spilled 88-120 bytes under triton 3.9), and
# needs triton 3.7: under 3.6 ptxas spilled it by 284 bytes (4.4 KB, and 7.8 KB under 3.7, before its vectors
# were anchored on the tile's layout). ANCHOR is on for the 64 tile (one program per SM: nothing hides its
# barriers); at 32 (two programs per SM) it took 928 instructions and 14 barriers an iteration instead of 621 and
# 24, and is left off.
RESIDENT_TILES = ((32, 4, 1, False),) + (((64, 8, 4, True),) if _triton_version() >= (3, 7) else ())
RESIDENT_MAX = RESIDENT_TILES[-1][0]


def resident_tile(length: int, from_points: bool = True,
                  largest: int | None = None) -> tuple[int, int, int, bool] | None:
    """The resident tile (side, num_warps, groups, anchor) of a pair whose longer side has ``length`` tokens, or
    None where it streams; ``largest`` leaves out the tiles of a longer side (``OTFAST_TRITON_RESIDENT``)."""
    tiles = RESIDENT_TILES if from_points else RESIDENT_TILES[:1]
    return next((tile for tile in tiles if length <= tile[0] and (largest is None or tile[0] <= largest)), None)


PRECISIONS = ("ieee", "tf32x3")  # tl.dot precision of S @ y in the backward; plain tf32 is too coarse
STREAM_BLOCK = 32
STREAM_WARPS = 4
# The streaming kernel's fast passes read the absorbed cost while every potential stays within this many binary
# orders (at the pass's temperature) of the anchors it was formed on, else form it again (``_stream_softmin``).
STREAM_DRIFT = 16.0
# Where the streaming solvers read their cost from (OTFAST_TRITON_STREAM, ``triton_backend.stream_source``): the
# packed cost and the absorbed cost its fast passes store (12 B N M bytes), the packed cost alone (8), or each tile
# formed again from the points in every pass (no [B, N, M] buffer; 2 D float64 flops per entry and pass). "auto"
# takes the first whose buffers fit in STREAM_MEMORY_SHARE of the device's memory, and "points" beyond that (or
# where a pair's problem has 2^31 or more entries, which the packed cost cannot index).
STREAM_SOURCES = ("absorbed", "cost", "points")
STREAM_MEMORY_SHARE = 0.125
# The split kernel forming its tiles from the points spilled 52-60 bytes at 4 warps under triton 3.6 and 3.7
# (persistent), and 24 bytes in phases under 3.6 once its precise passes took float64 exponentials; at 8 it does
# not (one program per SM either way when persistent: the split grid never exceeds the SM count).
SPLIT_POINTS_WARPS = 8
# With OTFAST_TRITON_SPLIT on (by default on a GPU), a streamed pair and problem splits its rows among programs
# (``_sinkhorn_split_kernel``) only where pairs x problems leave SMs idle, and into no more programs than
# give the longer side this many rows each (``triton_backend.split_count``).
SPLIT_MIN_ROWS = 64
SPLIT_MODES = ("auto", "off", "persistent", "phases")  # OTFAST_TRITON_SPLIT (``triton_backend.split_mode``)
CENTRE_BLOCK = (32, 64)  # BLOCK_R, BLOCK_D; the bounds kernel's too
CENTRE_WARPS = 4
COST_BLOCK = (64, 64, 16)  # BLOCK_N, BLOCK_M, BLOCK_K
# The streaming solvers form a tile from the points (STREAM_SOURCES "points") in the cost kernel's BLOCK_K steps.
STREAM_BLOCK_K = COST_BLOCK[2]
COST_WARPS = 4
GRAD_BLOCK = (32, 32, 32, 32)  # BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_DO (BLOCK_K 16: twice the DMMA loop's trips)
GRAD_WARPS = 8
# The backward splits the output features among programs only while pairs x row blocks x sides leave fewer
# programs than this many per SM (``triton_backend.feature_groups``): each split forms the cost tiles again.
GRAD_PROGRAMS_PER_SM = 2
# No software pipelining by default (the solvers' tile loops: staging the next tile through shared memory costs each
# tile 38-104 SASS instructions and 2 barriers); the backward's loops ask for sinkhorn.STAGES themselves (its S @ y
# slices with the ieee dot only).
NUM_STAGES = 1
# Fused multiply-adds on (triton's default, named so that triton >= 3.9 does not warn that its default will
# change): the kernels' error-free subtractions (TwoSum) contain no products to fuse, and the exponent
# -u k + w is better rounded once.
FP_FUSION = True
# What every kernel compiles with: the launchers pass these, and the sm_90 resource check compiles with them.
COMPILE_OPTIONS = dict(num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
# The register limit (ptxas's .maxnreg: the hardware's) of the streaming kernel and of the split kernel in phases.
# Left to itself, ptxas (triton 3.8's) held the streaming kernel forming its tiles from the points, with tol, to
# 168 registers (three programs per SM) and spilled 32-136 bytes, and (3.6-3.9) the split kernel in phases once
# its precise passes took float64 exponentials (8-40 bytes). Not for the others: with it, the persistent split
# kernel spilled 44-72 bytes.
STREAM_MAXNREG = 255


# The dtypes of the points X, Y the kernels that read points are compiled for: the loss passes fp32 (or
# float64) embeddings as they are, the cosine cost its float64 normalised points.
POINT_DTYPES = ("fp32", "fp64")


class Config(NamedTuple):
    """One compiled configuration: kernel name, constexprs, num_warps, the dtype of the points X, Y (None for a
    kernel that reads no points) and the register limit (None: ptxas's choice)."""

    kernel: str
    constexprs: dict
    warps: int
    points: str | None = None
    maxnreg: int | None = None


def split_warps(from_points: bool) -> int:
    """num_warps of the split kernel (``SPLIT_POINTS_WARPS``)."""
    return SPLIT_POINTS_WARPS if from_points else STREAM_WARPS


def split_maxnreg(persistent: bool) -> int | None:
    """maxnreg of the split kernel (``STREAM_MAXNREG`` in phases)."""
    return None if persistent else STREAM_MAXNREG


def configs() -> list[Config]:
    """Every configuration a launcher can choose (all with ``COMPILE_OPTIONS``)."""
    out = []
    for from_points in (True, False):
        for symmetric in (None,) if from_points else (False, True):
            for has_tol in (False, True):
                for side, warps, groups, anchor in RESIDENT_TILES if from_points else RESIDENT_TILES[:1]:
                    consts = dict(BLOCK_N=side, BLOCK_M=side, GROUPS=groups, FROM_POINTS=from_points, ANCHOR=anchor,
                                  SYMMETRIC=symmetric, HAS_TOL=has_tol)
                    for points in POINT_DTYPES if from_points else (None,):
                        out.append(Config("_sinkhorn_resident_kernel", consts, warps, points))
    stream = dict(BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK, BLOCK_K=STREAM_BLOCK_K)
    for has_tol in (False, True):
        for source in STREAM_SOURCES:
            from_points = source == "points"
            consts = dict(stream, HAS_TOL=has_tol, ABSORB=source == "absorbed", FROM_POINTS=from_points)
            for points in POINT_DTYPES if from_points else (None,):
                out.append(Config("_sinkhorn_streaming_kernel", consts, STREAM_WARPS, points, STREAM_MAXNREG))
        for persistent in (False, True):
            for from_points in (False, True):
                consts = dict(stream, HAS_TOL=has_tol, PERSISTENT=persistent, FROM_POINTS=from_points)
                for points in POINT_DTYPES if from_points else (None,):
                    out.append(Config("_sinkhorn_split_kernel", consts, split_warps(from_points), points,
                                      split_maxnreg(persistent)))
    br, bd = CENTRE_BLOCK
    bn, bm, bk = COST_BLOCK
    for points in POINT_DTYPES:
        out.append(Config("_centre_kernel", dict(BLOCK_R=br, BLOCK_D=bd), CENTRE_WARPS, points))
        out.append(Config("_bounds_kernel", dict(BLOCK_R=br, BLOCK_D=bd), CENTRE_WARPS, points))
        out.append(Config("_cost_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk), COST_WARPS, points))
    bn, bm, bk, bdo = GRAD_BLOCK
    for precision in PRECISIONS:
        for points in POINT_DTYPES:
            out.append(Config("_grad_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo,
                                                   PRECISION=precision), GRAD_WARPS, points))
    return out
