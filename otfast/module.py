"""``nn.Module`` face of ``otfast.sinkhorn_loss``."""

from __future__ import annotations

import torch
from torch import nn

from .functional import sinkhorn_loss


class SinkhornLoss(nn.Module):
    """Sinkhorn loss between batches of token embeddings, as a module.

    Takes the keyword arguments of ``otfast.sinkhorn_loss`` (cost, blur, eps, scaling, n_iters, tol,
    debias, reach, diameter, reduction, backend) and is called as ``loss(x, y, mask_x, mask_y)``.

    Example:
        >>> loss = otfast.SinkhornLoss(blur=0.05, scaling=0.5)
        >>> value = loss(x, y, batch_x["attention_mask"], batch_y["attention_mask"])
    """

    def __init__(self, **kwargs):
        super().__init__()
        sinkhorn_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), backend="torch",
                      **{k: v for k, v in kwargs.items() if k != "backend"})
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None = None,
                mask_y: torch.Tensor | None = None, weights_x: torch.Tensor | None = None,
                weights_y: torch.Tensor | None = None) -> torch.Tensor:
        return sinkhorn_loss(x, y, mask_x, mask_y, weights_x=weights_x, weights_y=weights_y, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
