"""otfast: fast optimal-transport losses for aligning token embeddings.

Public API: ``sinkhorn`` (cost matrices), ``sinkhorn_loss`` / ``SinkhornLoss`` (embeddings, GeomLoss
semantics), ``SinkhornResult`` and ``backends()``; word alignments from OT plans: ``plan_alignments``,
``alignment_links``, ``word_alignments``.
"""

from .alignment import alignment_links, plan_alignments, word_alignments
from .backends import BackendInfo, backends
from .functional import SinkhornResult, sinkhorn, sinkhorn_loss
from .module import SinkhornLoss

__version__ = "0.1.0"

__all__ = ["BackendInfo", "SinkhornLoss", "SinkhornResult", "alignment_links", "backends",
           "plan_alignments", "sinkhorn", "sinkhorn_loss", "word_alignments", "__version__"]
