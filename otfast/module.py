"""``nn.Module`` face of ``otfast.sinkhorn_loss``."""

from __future__ import annotations

import torch
from torch import nn

from .functional import check_loss_options, sinkhorn_loss


class SinkhornLoss(nn.Module):
    """Sinkhorn loss between batches of token embeddings, as a module.

    Takes the options of ``otfast.sinkhorn_loss`` (same names, defaults and meaning), checks them when it is
    built (a bad option is a ``ValueError`` / ``TypeError`` here, not at the first batch), and is called as
    ``loss(x, y, mask_x, mask_y, weights_x=None, weights_y=None)``.

    Example:
        >>> loss = otfast.SinkhornLoss(blur=0.05, scaling=0.5)
        >>> value = loss(x, y, batch_x["attention_mask"], batch_y["attention_mask"])
    """

    def __init__(self, *, cost: str = "sqeuclidean", blur: float = 0.05, eps: float | None = None,
                 scaling: float | None = 0.5, n_iters: int | None = None, tol: float | None = None,
                 debias: bool = True, reach: float | None = None, diameter: float | None = None,
                 reduction: str = "mean", backend: str = "auto", check_inputs: bool = True):
        super().__init__()
        check_loss_options(cost=cost, blur=blur, eps=eps, scaling=scaling, n_iters=n_iters, tol=tol, reach=reach,
                           diameter=diameter, reduction=reduction, backend=backend)
        self.options = dict(cost=cost, blur=blur, eps=eps, scaling=scaling, n_iters=n_iters, tol=tol, debias=debias,
                            reach=reach, diameter=diameter, reduction=reduction, backend=backend,
                            check_inputs=check_inputs)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None = None,
                mask_y: torch.Tensor | None = None, weights_x: torch.Tensor | None = None,
                weights_y: torch.Tensor | None = None) -> torch.Tensor:
        return sinkhorn_loss(x, y, mask_x, mask_y, weights_x=weights_x, weights_y=weights_y, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
