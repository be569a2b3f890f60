"""otfast: fast optimal-transport losses for aligning token embeddings.

Public API: ``sinkhorn`` (cost matrices), ``sinkhorn_loss`` / ``SinkhornLoss`` (embeddings, GeomLoss
semantics), ``SinkhornResult`` and ``backends()``.
"""

from .backends import BackendInfo, backends
from .functional import SinkhornLossFunction, SinkhornResult, sinkhorn, sinkhorn_loss
from .module import SinkhornLoss

__version__ = "0.1.0"

__all__ = ["BackendInfo", "SinkhornLoss", "SinkhornLossFunction", "SinkhornResult", "backends", "sinkhorn",
           "sinkhorn_loss", "__version__"]
