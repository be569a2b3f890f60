"""An embedded synthetic language pair: the default data of the demo and of the harness tests.

The target side is English-like: sentences drawn from a handful of templates over small lists of
real English words (determiners, adjectives, nouns, verbs, prepositions, adverbs). The source side
("xx") is the same sentence through

1. a bijective word map: every English word gets its own pseudo-word built from syllables, so source
   and target share no word (and, with a tokenizer trained on both, few sub-words);
2. local reordering: every adjective follows its noun (as in French or Spanish), and with probability
   ``swap_prob`` one more random pair of neighbouring words is swapped.

Everything is deterministic given the seed: the word map depends on ``map_seed`` only, the sentences
on ``seed``, so training and held-out pairs drawn with different ``seed`` share one language pair.

Rows come in the schema of ``train.data``'s loaders: ``{"source": str, "target": str}``, a
``datasets.Dataset`` with those two string columns.

Example:
    >>> from train.synthetic import synthetic_pairs
    >>> ds = synthetic_pairs(1000, seed=0)
    >>> ds[0]["target"]
    'rarely the clever painter calls every road'
"""

from __future__ import annotations

import random

import datasets

DETERMINERS = ("the", "a", "this", "that", "every", "some", "my", "our")
ADJECTIVES = ("small", "big", "red", "green", "old", "young", "happy", "quiet", "bright", "dark", "cold",
              "warm", "strong", "gentle", "heavy", "simple", "clever", "lazy", "busy", "rich", "poor",
              "tall", "short", "proud", "brave", "calm", "wild", "soft", "loud", "sweet")
NOUNS = ("dog", "cat", "house", "river", "teacher", "child", "city", "garden", "book", "window", "farmer",
         "doctor", "bird", "horse", "table", "letter", "mountain", "village", "king", "queen", "student",
         "forest", "road", "bridge", "song", "boat", "friend", "mother", "father", "baker", "soldier",
         "painter", "apple", "flower", "school", "market", "train", "island", "lamp", "door")
VERBS = ("sees", "likes", "finds", "helps", "carries", "paints", "follows", "builds", "watches", "visits",
         "opens", "holds", "calls", "reads", "loves", "brings", "meets", "cleans", "draws", "answers")
PREPOSITIONS = ("near", "behind", "under", "with", "without", "beside", "across", "inside")
ADVERBS = ("today", "often", "slowly", "quickly", "again", "always", "rarely", "quietly")

_CATEGORY = {**{w: "det" for w in DETERMINERS}, **{w: "adj" for w in ADJECTIVES},
             **{w: "noun" for w in NOUNS}, **{w: "verb" for w in VERBS},
             **{w: "prep" for w in PREPOSITIONS}, **{w: "adv" for w in ADVERBS}}
ENGLISH_VOCABULARY = tuple(_CATEGORY)

# Sentence templates over word categories; "np" is a noun phrase: det [adj] noun.
_TEMPLATES = (
    ("np", "verb", "np"),
    ("np", "verb", "np", "adv"),
    ("np", "verb", "np", "prep", "np"),
    ("adv", "np", "verb", "np"),
    ("np", "prep", "np", "verb", "np"),
    ("np", "verb", "np", "prep", "np", "adv"),
)
_CONSONANTS = "bcdfgklmnprstvz"
_VOWELS = "aeiou"


def word_map(map_seed: int = 1234) -> dict[str, str]:
    """The bijective map from English words to source pseudo-words.

    Args:
        map_seed: seed of the pseudo-word generator; the same seed always gives the same map.

    Returns:
        ``{english_word: source_word}`` over ``ENGLISH_VOCABULARY``; values are distinct lowercase
        words of 2 to 4 consonant-vowel syllables, none of them an English word of the vocabulary.
    """
    rng = random.Random(map_seed)
    taken = set(ENGLISH_VOCABULARY)
    mapping = {}
    for word in ENGLISH_VOCABULARY:
        while True:
            n_syllables = rng.randint(2, 4)
            candidate = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n_syllables))
            if candidate not in taken:
                break
        taken.add(candidate)
        mapping[word] = candidate
    return mapping


def _noun_phrase(rng: random.Random, adj_prob: float) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < adj_prob:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(NOUNS))
    return words


def _english_sentence(rng: random.Random, adj_prob: float) -> list[str]:
    words: list[str] = []
    for slot in rng.choice(_TEMPLATES):
        if slot == "np":
            words += _noun_phrase(rng, adj_prob)
        else:
            words.append(rng.choice({"verb": VERBS, "prep": PREPOSITIONS, "adv": ADVERBS}[slot]))
    return words


def _reorder(words: list[str], rng: random.Random, swap_prob: float) -> list[str]:
    out = list(words)
    i = 0
    while i < len(out) - 1:  # adjective after its noun
        if _CATEGORY[out[i]] == "adj" and _CATEGORY[out[i + 1]] == "noun":
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    if len(out) > 1 and rng.random() < swap_prob:
        j = rng.randrange(len(out) - 1)
        out[j], out[j + 1] = out[j + 1], out[j]
    return out


def synthetic_pairs(n_pairs: int, seed: int = 0, *, map_seed: int = 1234, adj_prob: float = 0.5,
                    swap_prob: float = 0.3) -> datasets.Dataset:
    """Draw parallel sentences of the synthetic language pair.

    Args:
        n_pairs: number of sentence pairs (> 0).
        seed: seed of the sentence sampler (use different seeds for training and held-out pairs).
        map_seed: seed of the word map (keep it fixed to stay in one language pair).
        adj_prob: probability that a noun phrase carries an adjective.
        swap_prob: probability of one extra swap of neighbouring source words per sentence.

    Returns:
        ``datasets.Dataset`` with string columns ``source`` (the pseudo-language) and ``target``
        (English-like), ``n_pairs`` rows, words separated by single spaces.

    Raises:
        ValueError: if ``n_pairs`` < 1 or a probability is outside [0, 1].
    """
    if not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"n_pairs must be a positive int, got {n_pairs!r}")
    for name, p in (("adj_prob", adj_prob), ("swap_prob", swap_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    mapping = word_map(map_seed)
    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(n_pairs):
        english = _english_sentence(rng, adj_prob)
        sources.append(" ".join(mapping[w] for w in _reorder(english, rng, swap_prob)))
        targets.append(" ".join(english))
    return datasets.Dataset.from_dict({"source": sources, "target": targets})
