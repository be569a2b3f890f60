"""SQuAD v1.1 scoring, as the official ``evaluate-v1.1.py`` defines it.

An answer is normalised by lower-casing, removing punctuation (``string.punctuation``), removing the
articles a/an/the and collapsing whitespace. Per question the score is the best over its gold answers of
exact match (normalised strings equal) and token F1 (bag-of-tokens overlap of the normalised strings);
a question without a prediction scores 0. Totals are means over all questions, in percent.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, drop a/an/the, collapse whitespace (in this order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 in [0, 1] between the normalised prediction and gold answer."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def iter_questions(dataset: list[dict]):
    """Yield ``(article_title, context, qa)`` for every question of a SQuAD-schema ``data`` list."""
    if not isinstance(dataset, list):
        raise TypeError(f"dataset must be the list under 'data', got {type(dataset).__name__}")
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield article.get("title", ""), paragraph["context"], qa


def score(questions, predictions: dict[str, str], *, warn=sys.stderr) -> dict[str, float]:
    """EM and F1 over questions given as ``(question_id, gold_answer_texts)``.

    Args:
        questions: iterable of ``(id, [gold answer text, ...])``.
        predictions: question id -> predicted answer text; missing ids score 0.
        warn: stream for the official "Unanswered question ... will receive score 0." lines (None: silent).

    Returns:
        ``{"exact_match": EM, "f1": F1}`` in percent over all questions.

    Raises:
        ValueError: if ``predictions`` is not a mapping of answer strings (``check_predictions``), or a
            question has no gold answer.
    """
    check_predictions(predictions)
    total = em = f1 = 0.0
    for qid, golds in questions:
        total += 1
        if qid not in predictions:
            if warn is not None:
                print(f"Unanswered question {qid} will receive score 0.", file=warn)
            continue
        if not golds:
            raise ValueError(f"question {qid} has no gold answer (SQuAD v1.1 questions all have one)")
        pred = predictions[qid]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    if total == 0:
        raise ValueError("the dataset holds no question")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def evaluate(dataset: list[dict], predictions: dict[str, str], *, warn=sys.stderr) -> dict[str, float]:
    """Score predictions against a SQuAD v1.1 dataset, as ``evaluate-v1.1.py`` does.

    Args:
        dataset: the ``data`` list of a SQuAD v1.1 / XQuAD file (articles -> paragraphs -> qas -> answers).
        predictions: question id -> predicted answer text.
        warn: as in ``score``.

    Returns:
        ``{"exact_match": EM, "f1": F1}`` in percent over every question of the dataset.
    """
    questions = ((qa["id"], [a["text"] for a in qa["answers"]]) for _, _, qa in iter_questions(dataset))
    return score(questions, predictions, warn=warn)


def to_records(dataset: list[dict]) -> list[dict]:
    """Flatten a SQuAD ``data`` list into the Hugging Face ``squad`` rows.

    Returns:
        ``[{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}]``.
    """
    return [{"id": qa["id"], "title": title, "context": context, "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [int(a["answer_start"]) for a in qa["answers"]]}}
            for title, context, qa in iter_questions(dataset)]


def load_squad_file(path: str | Path) -> list[dict]:
    """The ``data`` list of a SQuAD v1.1 / XQuAD JSON file."""
    with open(path, encoding="utf-8") as fh:
        obj = json.load(fh)
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise ValueError(f"{path}: not a SQuAD file (expected a JSON object with a 'data' list)")
    return obj["data"]


def check_predictions(predictions: Any, where: str = "predictions") -> None:
    """Raise a ``ValueError`` naming ``where`` and the first question whose prediction is not a string."""
    if not isinstance(predictions, dict):
        raise ValueError(f"{where} must map question ids to answer strings, got {type(predictions).__name__}")
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise ValueError(f"{where}: the prediction for question {qid!r} is {answer!r} "
                             f"({type(answer).__name__}), not an answer string")


def load_predictions(path: str | Path) -> dict[str, str]:
    """A predictions file: one JSON object mapping question id -> answer text.

    Raises:
        ValueError: naming the file, if it is not JSON or not such an object (``check_predictions``).
    """
    with open(path, encoding="utf-8") as fh:
        obj = json.load(fh)
    check_predictions(obj, str(path))
    return obj
