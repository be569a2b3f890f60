"""Encoders and word representations for alignment.

- ``load_encoder``: any Hugging Face encoder and its tokenizer (``AutoModel`` / ``AutoTokenizer``,
  ``from_pretrained`` by hub name or local path: mBERT, XLM-R, or a folder this module wrote).
- ``build_tiny_model``: a tiny BERT from a ``BertConfig`` (random init) and a WordPiece tokenizer
  trained on the fly on given text, saved with ``save_pretrained`` so ``load_encoder`` reloads it.
- ``encode_words``: word-tokenised sentences to input ids plus a ``[B, T]`` token-to-word index, cut to
  ``max_length`` tokens at a word boundary (``n_words`` says how many words each sentence kept).
- ``position_limit``: the most tokens a model takes in one sequence.
- ``token_check``: which sentence pairs ``encode_words`` would leave without a token on a side, or cut.
- ``layer_states``: the hidden states of one layer.
- ``word_embeddings``: sub-word states to word representations (``last`` sub-word as in the paper's
  WordOT, ``first``, ``mean``, or the sub-words themselves, ``subword`` = SubOT), padded to
  ``[B, W, D]`` with a ``[B, W]`` mask, ready for ``otfast.sinkhorn_loss``. Special tokens ([CLS],
  [SEP], <s>, </s>, padding) never take part.

Example:
    >>> model, tok = load_encoder(build_tiny_model(sentences, "runs/tiny/init_model"))
    >>> batch = encode_words(tok, [s.split() for s in sentences[:8]])
    >>> h = layer_states(model, batch, layer=-1)                   # [B, T, D]
    >>> x, mask = word_embeddings(h, batch["word_ids"], "last")    # [B, W, D], [B, W]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from .hub import model_source

WORD_MODES = ("last", "first", "mean", "subword")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_encoder(name_or_path: str | Path, **model_kwargs):
    """Load an encoder and its tokenizer with ``from_pretrained``.

    Args:
        name_or_path: a hub name (``bert-base-multilingual-cased``, ``xlm-roberta-base``) or a local
            folder written by ``save_pretrained`` (e.g. by ``build_tiny_model``).
        **model_kwargs: passed to ``AutoModel.from_pretrained`` (e.g. ``torch_dtype``).

    Returns:
        ``(model, tokenizer)``: the base encoder (no task head) and its fast tokenizer.

    Raises:
        TypeError: if the tokenizer is not a fast tokenizer (word ids need one).
        FileNotFoundError: a missing folder, or a hub name without network or cached copy
            (``train.hub.model_source``).
    """
    tokenizer = load_tokenizer(name_or_path)
    source, kwargs = model_source(name_or_path)
    model = AutoModel.from_pretrained(source, **kwargs, **model_kwargs)
    return model, tokenizer


def load_tokenizer(name_or_path: str | Path):
    """The fast tokenizer of ``load_encoder`` alone.

    Raises:
        TypeError, FileNotFoundError: as ``load_encoder``.
    """
    source, kwargs = model_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if not tokenizer.is_fast:
        raise TypeError(f"{name_or_path}: a fast tokenizer is needed for sub-word to word mapping, got "
                        f"{type(tokenizer).__name__}")
    return tokenizer


def build_tiny_model(texts: Iterable[str], output_dir: str | Path, *, vocab_size: int = 500,
                     hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                     intermediate_size: int = 128, max_position_embeddings: int = 64,
                     dropout: float = 0.0, word_embedding_std: float | None = None, seed: int = 0) -> Path:
    """Train a WordPiece tokenizer on ``texts``, build a random-init tiny BERT, save both.

    Args:
        texts: training text for the tokenizer (e.g. both sides of the parallel corpus).
        output_dir: folder to write (``config.json``, ``model.safetensors``, tokenizer files).
        vocab_size: WordPiece vocabulary size, special tokens included.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
        max_position_embeddings: the ``BertConfig`` fields of the same names.
        dropout: hidden and attention dropout.
        word_embedding_std: if given, the word embeddings are drawn from N(0, std^2) instead of BERT's
            N(0, 0.02^2), so that word identity rather than position dominates the random encoder's
            states (as it does in a pretrained one).
        seed: seed of the random initialisation.

    Returns:
        ``output_dir`` as a ``Path``; ``load_encoder(output_dir)`` reloads model and tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=False)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    wordpiece.train_from_iterator(texts, trainer=trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, do_lower_case=False,
                                  model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(output_dir)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=hidden_size,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        pad_token_id=wordpiece.token_to_id("[PAD]"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
        if word_embedding_std is not None:
            with torch.no_grad():
                model.embeddings.word_embeddings.weight.normal_(0.0, word_embedding_std)
    model.save_pretrained(output_dir)
    return output_dir


def encode_words(tokenizer, words: Sequence[Sequence[str]], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenise word-split sentences and keep the token-to-word index.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        words: ``B`` sentences, each a list of words (e.g. from the Moses tokenizer).
        max_length: length limit in tokens, special tokens included. Sentences are cut at a word
            boundary: a word that does not fit whole is dropped with all the words after it.
            Padding is on the right, whatever the tokenizer's ``padding_side``.

    Returns:
        ``{"input_ids": [B, T], "attention_mask": [B, T], "word_ids": [B, T], "n_words": [B]}`` (long
        tensors); ``word_ids[b, t]`` is the index in ``words[b]`` of the word token t belongs to, -1 for
        special tokens and padding; ``n_words[b]`` is the number of words of ``words[b]`` kept (fewer than
        it has when it was cut).
    """
    n_words = [n for n, _, _ in _fit(tokenizer, words, max_length)]
    kept = [list(sentence[:n]) for sentence, n in zip(words, n_words)]
    # right padding whatever the tokenizer's default: BERT numbers positions 0..T-1 whatever the padding
    enc = tokenizer(kept, is_split_into_words=True, padding=True, padding_side="right", return_tensors="pt")
    ids = torch.full_like(enc["input_ids"], -1)
    for b in range(len(kept)):
        row = [-1 if w is None else w for w in enc.word_ids(b)]
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "word_ids": ids,
            "n_words": torch.tensor(n_words, dtype=torch.long)}


def position_limit(model, tokenizer) -> int | None:
    """The most tokens ``model`` takes in one sequence, special tokens included: the smaller of its config's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length`` where they are set (None: neither is).
    A longer input fails inside the model (an index error in its position embeddings)."""
    limits = [n for n in (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
              if isinstance(n, int) and n < VERY_LARGE_INTEGER]
    return min(limits) if limits else None


def _fit(tokenizer, words: Sequence[Sequence[str]], max_length: int) -> list[tuple[int, int, int]]:
    """Per sentence, ``(words kept, tokens kept, tokens in all)`` when cut at a word boundary to fit
    ``max_length`` tokens with the special tokens (the truncation rule of ``encode_words``)."""
    if not words:
        return []
    budget = max(max_length - tokenizer.num_special_tokens_to_add(), 0)
    plain = tokenizer([list(w) for w in words], is_split_into_words=True, add_special_tokens=False,
                      verbose=False)                    # no warning about a length this function deals with
    out = []
    for b, sentence in enumerate(words):
        owners = plain.word_ids(b)
        if len(owners) <= budget:
            out.append((len(sentence), len(owners), len(owners)))
        else:
            cut = owners[budget]                                # the first word that does not fit whole
            out.append((cut, owners.index(cut), len(owners)))
    return out


def token_check(tokenizer, max_length: int):
    """A ``train.data.prepare_language`` check: the pairs that ``encode_words`` would leave with no token, and
    those it would cut.

    Args:
        tokenizer: the model's fast tokenizer.
        max_length: as in ``encode_words``.

    Returns:
        ``check(sources, targets) -> [(drop, cut), ...]`` over space-separated words, per pair: ``drop`` is
        ``"source: no sub-word token"`` (the tokenizer strips the whole side: U+FFFD, zero-width spaces,
        control characters) or ``"source: no sub-word token within max_length N"`` (the first word alone is
        longer than the budget), likewise for ``target``, or None; ``cut`` is ``"source: cut to max_length N
        tokens"`` (the words after the cut are not trained on), likewise ``target`` or ``source and target``, or
        None.
    """
    def verdicts(side: str, sentences: list[str]) -> list[tuple[str | None, str | None]]:
        split = [s.split() for s in sentences]
        return [(None if kept else f"{side}: no sub-word token" if total == 0 else
                 f"{side}: no sub-word token within max_length {max_length}",
                 f"{side}: cut to max_length {max_length} tokens" if kept and n_words < len(words) else None)
                for words, (n_words, kept, total) in zip(split, _fit(tokenizer, split, max_length))]

    def cut(s: str | None, t: str | None) -> str | None:  # a pair cut on both sides says so
        return f"source and target{s.removeprefix('source')}" if s and t else s or t

    def check(sources: list[str], targets: list[str]) -> list[tuple[str | None, str | None]]:
        pairs = zip(verdicts("source", sources), verdicts("target", targets))
        return [(s[0] or t[0], cut(s[1], t[1])) for s, t in pairs]

    return check


def layer_states(model, batch: dict[str, torch.Tensor], layer: int = -1) -> torch.Tensor:
    """Hidden states of one layer.

    Args:
        model: a Hugging Face encoder (possibly wrapped by DDP).
        batch: ``input_ids`` and ``attention_mask``, ``[B, T]``.
        layer: index into ``hidden_states`` (0 = embeddings, 1..L = layers, -1 = last).

    Returns:
        ``[B, T, D]`` states of that layer.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer]


def word_embeddings(hidden: torch.Tensor, word_ids: torch.Tensor, mode: str = "last"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-word states to padded word representations.

    Args:
        hidden: ``[B, T, D]`` token states.
        word_ids: ``[B, T]`` long, word index of each token, -1 for special tokens and padding
            (``encode_words``' ``word_ids``).
        mode: ``"last"`` (the last sub-word of each word, the paper's WordOT), ``"first"``, ``"mean"``
            (average of the word's sub-words) or ``"subword"`` (every non-special token, SubOT).

    Returns:
        ``(x, mask)``: ``x`` ``[B, W, D]`` word (or sub-word) representations, left-packed in order,
        zero on padding; ``mask`` ``[B, W]`` bool, True where a word is. ``W`` is the largest count
        in the batch (at least 1).

    Raises:
        ValueError: on an unknown mode or mismatched shapes.
    """
    if mode not in WORD_MODES:
        raise ValueError(f"mode must be one of {WORD_MODES}, got {mode!r}")
    if hidden.dim() != 3 or word_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, D] and word_ids [B, T], got {tuple(hidden.shape)} and "
                         f"{tuple(word_ids.shape)}")
    B, T, D = hidden.shape
    if mode == "subword":
        keep = word_ids >= 0
        counts = keep.sum(1)
        W = max(int(counts.max()), 1) if B else 1
        slot = torch.cumsum(keep.long(), 1) - 1                      # position among kept tokens
        x = hidden.new_zeros(B, W, D)
        rows = torch.arange(B, device=hidden.device).unsqueeze(1).expand(B, T)
        x = x.index_put((rows[keep], slot[keep]), hidden[keep])
        mask = torch.arange(W, device=hidden.device).unsqueeze(0) < counts.unsqueeze(1)
        return x, mask
    W = max(int(word_ids.max()) + 1, 1) if word_ids.numel() else 1
    member = word_ids.unsqueeze(1) == torch.arange(W, device=word_ids.device).view(1, W, 1)   # [B, W, T]
    mask = member.any(-1)
    if mode == "mean":
        weights = member.to(hidden.dtype)
        x = weights @ hidden / weights.sum(-1, keepdim=True).clamp_min(1)
    else:
        order = member if mode == "first" else member.flip(-1)
        pos = order.to(torch.uint8).argmax(-1)                        # first True along T
        if mode == "last":
            pos = T - 1 - pos
        x = torch.gather(hidden, 1, pos.unsqueeze(-1).expand(B, W, D))
        x = x * mask.unsqueeze(-1).to(x.dtype)
    return x, mask
