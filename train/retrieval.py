"""Cross-lingual sentence retrieval: mean-pooled sentence embeddings and nearest-neighbour accuracy.

A sentence is the mean of one layer's token states over its non-special tokens (no [CLS], [SEP],
<s>, </s> or padding). Retrieval pairs each source sentence with its nearest target sentence by
cosine similarity (and the other way round); accuracy is the share of sentences whose nearest
neighbour is their own translation. Chance level is 1 / (number of sentences).

Example:
    >>> emb_src = sentence_embeddings(model, tok, sources)      # [S, D]
    >>> emb_tgt = sentence_embeddings(model, tok, targets)      # [S, D]
    >>> retrieval_accuracy(emb_src, emb_tgt)
    {'src2tgt': 0.93, 'tgt2src': 0.91, 'mean': 0.92}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .modeling import layer_states


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: Sequence[str], *, layer: int = -1, batch_size: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled sentence embeddings from one layer, special tokens excluded.

    Args:
        model: a Hugging Face encoder; it is run in eval mode and restored to its previous mode.
        tokenizer: its tokenizer.
        sentences: ``S`` raw sentences.
        layer: index into ``hidden_states`` (0 = embeddings, -1 = last layer).
        batch_size: sentences per forward pass.
        max_length: truncation length in tokens. Padding is on the right, whatever the tokenizer's
            ``padding_side`` (BERT numbers positions 0..T-1 whatever the padding).

    Returns:
        ``[S, D]`` float32 embeddings on the CPU. A sentence with no non-special token (empty) gets
        a zero vector.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(sentences), batch_size):
            enc = tokenizer(list(sentences[start:start + batch_size]), truncation=True, max_length=max_length,
                            padding=True, padding_side="right", return_special_tokens_mask=True, return_tensors="pt")
            batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            h = layer_states(model, batch, layer).float()
            keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).to(device)
            w = keep.unsqueeze(-1).to(h.dtype)
            out.append(((h * w).sum(1) / w.sum(1).clamp_min(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def retrieval_accuracy(source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Cosine nearest-neighbour retrieval accuracy in both directions.

    Args:
        source: ``[S, D]`` embeddings; row i is the translation of ``target`` row i.
        target: ``[S, D]`` embeddings.

    Returns:
        ``{"src2tgt": acc, "tgt2src": acc, "mean": (src2tgt + tgt2src) / 2}``, accuracies in [0, 1].

    Raises:
        ValueError: if the shapes differ or are not ``[S, D]`` with S >= 1.
    """
    if source.dim() != 2 or source.shape != target.shape or source.shape[0] < 1:
        raise ValueError(f"source and target must both be [S, D] with S >= 1, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    sim = F.normalize(source.double(), dim=1) @ F.normalize(target.double(), dim=1).T
    gold = torch.arange(sim.shape[0])
    s2t = (sim.argmax(1) == gold).double().mean().item()
    t2s = (sim.argmax(0) == gold).double().mean().item()
    return {"src2tgt": s2t, "tgt2src": t2s, "mean": (s2t + t2s) / 2}


def evaluate_retrieval(model, tokenizer, sources: Sequence[str], targets: Sequence[str], *, layer: int = -1,
                       batch_size: int = 64, max_length: int = 128) -> dict[str, float]:
    """Retrieval accuracy of an encoder on parallel sentences.

    Args:
        model, tokenizer: as in ``sentence_embeddings``.
        sources: ``S`` source-language sentences.
        targets: their ``S`` translations, in the same order.
        layer, batch_size, max_length: as in ``sentence_embeddings``.

    Returns:
        ``retrieval_accuracy``'s dict.

    Raises:
        ValueError: if ``sources`` and ``targets`` differ in length or are empty.
    """
    if len(sources) != len(targets) or not sources:
        raise ValueError(f"need as many sources as targets (>= 1), got {len(sources)} and {len(targets)}")
    kw = {"layer": layer, "batch_size": batch_size, "max_length": max_length}
    return retrieval_accuracy(sentence_embeddings(model, tokenizer, sources, **kw),
                              sentence_embeddings(model, tokenizer, targets, **kw))
