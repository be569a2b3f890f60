"""Word alignments read off optimal-transport plans.

Given a plan P ``[B, N, M]`` between the N source words and M target words of each sentence pair
(``otfast.sinkhorn(...).plan()``), a link i-j is extracted by one of:

- ``"forward"``: j = argmax_j' P_ij' for every source word i (each source word gets one link);
- ``"backward"``: i = argmax_i' P_i'j for every target word j;
- ``"intersection"``: the links found both ways (high precision, the usual choice);
- ``"threshold"``: P_ij >= threshold * max(a_i, b_j), with a_i = sum_j P_ij and b_j = sum_i P_ij the plan's
  own marginals; equivalently both conditionals P_ij / a_i and P_ij / b_j reach ``threshold``. With
  uniform weights and N = M, a one-to-one plan has P_ij / a_i = 1 on its links.

Argmax ties go to the lowest index (``torch.argmax``). Padding (mask 0) never takes part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as chk
from .functional import sinkhorn

METHODS = ("forward", "backward", "intersection", "threshold")
ALIGN_COSTS = ("cosine", "sqeuclidean")


def plan_alignments(plan: torch.Tensor, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None,
                    *, method: str = "intersection", threshold: float | None = None) -> torch.Tensor:
    """Boolean link matrices from transport plans.

    Args:
        plan: ``[B, N, M]`` (or ``[N, M]``) non-negative transport plans.
        mask_a: ``[B, N]`` bool or int, 1 = word, 0 = padding; mask_b: ``[B, M]``, likewise.
        method: "forward", "backward", "intersection" or "threshold" (see the module docstring).
        threshold: in (0, 1], required by "threshold" and refused by the other methods.

    Returns:
        ``[B, N, M]`` (or ``[N, M]``) bool tensor, True where i-j is a link; False on padding.

    Example:
        >>> P = torch.tensor([[0.4, 0.1], [0.0, 0.5]])
        >>> plan_alignments(P).nonzero().tolist()
        [[0, 0], [1, 1]]
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "threshold":
        chk.check_positive("threshold", threshold)
        if threshold > 1:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    elif threshold is not None:
        raise ValueError(f"threshold is only used by method='threshold', not {method!r}")
    P, ma, mb, unbatched = chk.as_matrix_batch("plan", plan, mask_a, mask_b)
    _, N, M = P.shape
    valid = ma.unsqueeze(2) & mb.unsqueeze(1)
    if bool(((P < 0) & valid).any()):
        raise ValueError("plan has negative entries")
    P = torch.where(valid, P.detach(), torch.full((), -1.0, dtype=P.dtype, device=P.device))

    if method == "threshold":
        Pz = P.clamp_min(0)
        a, b = Pz.sum(2, keepdim=True), Pz.sum(1, keepdim=True)
        links = (Pz >= threshold * torch.maximum(a, b)) & (Pz > 0)
    else:
        fwd = F.one_hot(P.argmax(2), M).bool() & ma.unsqueeze(2)
        bwd = F.one_hot(P.argmax(1), N).bool().transpose(1, 2) & mb.unsqueeze(1)
        links = {"forward": fwd, "backward": bwd, "intersection": fwd & bwd}[method]
    links = links & valid
    return links[0] if unbatched else links


def alignment_links(links: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Link lists ``[(i, j), ...]`` per pair, sorted, from ``[B, N, M]`` bool link matrices."""
    if links.dim() != 3 or links.dtype != torch.bool:
        raise ValueError(f"links must be a 3-D bool tensor [B, N, M], got {links.dim()}-D {links.dtype}")
    out: list[list[tuple[int, int]]] = [[] for _ in range(links.shape[0])]
    for b, i, j in links.nonzero().tolist():
        out[b].append((i, j))
    return out


def word_alignments(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None = None,
                    mask_y: torch.Tensor | None = None, *, cost: str = "cosine", eps: float = 0.05,
                    n_iters: int = 200, tol: float | None = 1e-6, scaling: float | None = None,
                    method: str = "intersection", threshold: float | None = None,
                    backend: str = "auto") -> list[list[tuple[int, int]]]:
    """Word alignments between parallel sentences from the entropic OT plan of their word embeddings.

    Args:
        x: ``[B, N, D]`` source word embeddings; y: ``[B, M, D]`` target word embeddings.
        mask_x: ``[B, N]`` 1 = word, 0 = padding; mask_y: ``[B, M]``.
        cost: "cosine" (C = 1 - cos(x_i, y_j)) or "sqeuclidean" (C = |x_i - y_j|^2 / 2).
        eps, n_iters, tol, scaling, backend: passed to ``otfast.sinkhorn`` (uniform weights, balanced).
        method, threshold: how links are read off the plan (``plan_alignments``).

    Returns:
        Per pair, the sorted links ``[(i, j), ...]`` (0-based word indices, Pharaoh's ``i-j``).

    Example:
        >>> x = torch.eye(3)[None]; y = torch.eye(3)[[2, 0, 1]][None]
        >>> word_alignments(x, y)
        [[(0, 1), (1, 2), (2, 0)]]
    """
    chk.check_float_tensor("x", x)
    chk.check_float_tensor("y", y)
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must be [B, N, D] and [B, M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if cost not in ALIGN_COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(ALIGN_COSTS)}")
    dtype = chk.compute_dtype(x.dtype)
    xw, yw = x.detach().to(dtype), y.detach().to(dtype)
    if cost == "cosine":
        C = 1 - F.normalize(xw, dim=-1) @ F.normalize(yw, dim=-1).transpose(1, 2)
    else:
        C = 0.5 * torch.cdist(xw, yw).square()
    res = sinkhorn(C, mask_a=mask_x, mask_b=mask_y, eps=eps, n_iters=n_iters, tol=tol, scaling=scaling,
                   backend=backend)
    return alignment_links(plan_alignments(res.plan(), mask_x, mask_y, method=method, threshold=threshold))
