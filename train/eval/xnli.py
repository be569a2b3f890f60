"""XNLI zero-shot transfer: fine-tune a classifier on English NLI, select on English dev, test every language.

Data, per split and language, from a hub data set (``load_dataset("xnli", LANG)``: ``premise``,
``hypothesis``, ``label`` with 0 = entailment, 1 = neutral, 2 = contradiction) or local files: JSONL
or TSV in that schema, or the original XNLI-1.0 / MultiNLI TSV (``gold_label``, ``sentence1``,
``sentence2``, and for XNLI a ``language`` column used to pick the language), or XNLI-MT-1.0's
``multinli.train.LANG.tsv`` (``premise``, ``hypo``, ``label``, whose labels spell "contradictory"). A local path
may hold ``{lang}`` (a file per language). Files need a header row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..hub import load_dataset, model_source
from .finetune import TrainConfig, batches, device_of, finetune, set_seed
from .report import aggregate

LABELS = ("entailment", "neutral", "contradiction")
_LABEL_IDS = {**{name: i for i, name in enumerate(LABELS)}, "contradictory": 2}
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _label(value, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value in (0, 1, 2):
            return value
    elif isinstance(value, str) and value.strip() in _LABEL_IDS:
        return _LABEL_IDS[value.strip()]
    raise ValueError(f"{where}: unknown NLI label {value!r} (expected 0/1/2 or {', '.join(_LABEL_IDS)})")


def is_local(source: str, language: str) -> bool:
    """True when ``source`` (``{lang}`` substituted) names a local file rather than a hub data set.

    A folder is not a file: ``xnli`` stays the hub data set when the working directory holds a folder of that
    name (``datasets.load_dataset`` reads a local folder itself).
    """
    path = Path(source.replace("{lang}", language))
    return path.is_file() or path.suffix in (".tsv", ".jsonl", ".json", ".txt")


def read_nli_file(path: str | Path, language: str | None = None, *, one_language: bool = False) -> list[dict]:
    """Examples ``{"premise", "hypothesis", "label"}`` of a local NLI file (UTF-8, a byte-order mark allowed).

    Args:
        path: JSONL (one object per line) or TSV with a header, in the Hugging Face schema
            (premise/hypothesis/label) or the original XNLI / MultiNLI one (sentence1/sentence2/gold_label).
        language: keep only rows whose ``language`` column equals it.
        one_language: a file without a ``language`` column holds ``language`` alone (English training or dev
            data such as MultiNLI's) and is read whole; otherwise such a file is an error when ``language`` is
            given, since every language asked for would get the same rows.

    Returns:
        The examples, labels as ints 0/1/2. Rows labelled "-" (MultiNLI's no-consensus) are skipped.

    Raises:
        ValueError: naming the file (and line) of a row it cannot read, or a language it cannot pick.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if language is not None and rows and "language" not in rows[0]:
        if not one_language:
            raise ValueError(f"{path}: no 'language' column to pick language {language!r} from (columns: "
                             f"{', '.join(map(str, rows[0]))}); give a file per language, with {{lang}} in its path "
                             "(e.g. test-{lang}.tsv), or one with a language column such as XNLI-1.0's")
        language = None
    out = []
    for n, row in enumerate(rows, 2 if path.suffix not in (".jsonl", ".json") else 1):
        if language is not None and row.get("language") != language:
            continue
        if "premise" in row:  # XNLI-MT-1.0's multinli.train.LANG.tsv names the hypothesis "hypo"
            premise, hypothesis, label = row.get("premise"), row.get("hypothesis", row.get("hypo")), row.get("label")
        elif "sentence1" in row:
            premise, hypothesis, label = row.get("sentence1"), row.get("sentence2"), row.get("gold_label")
        else:
            raise ValueError(f"{path}:{n}: no premise/hypothesis or sentence1/sentence2 columns (a file needs a "
                             "header row)")
        if label == "-":
            continue
        if not isinstance(premise, str) or not isinstance(hypothesis, str):
            raise ValueError(f"{path}:{n}: premise and hypothesis must be strings")
        out.append({"premise": premise, "hypothesis": hypothesis, "label": _label(label, f"{path}:{n}")})
    if not out:
        raise ValueError(f"{path}: no example" + (f" for language {language!r}" if language else ""))
    return out


def load_nli(source: str, split: str, language: str) -> list[dict]:
    """One split of one language, from a hub data set name or a local file (``{lang}`` substituted).

    A local file without ``{lang}`` in its name is filtered by its ``language`` column; a training or dev file
    without the column is taken to hold the training language alone, a test file without it is an error.

    Args:
        source: e.g. ``"xnli"`` (``load_dataset("xnli", language)``) or ``"data/xnli.test.tsv"``.
        split: "train", "dev" or "test".
        language: an XNLI language code.
    """
    if split not in _HUB_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train, dev or test")
    if is_local(source, language):
        if "{lang}" in source:                          # a file per language
            return read_nli_file(source.replace("{lang}", language))
        return read_nli_file(source, language, one_language=split != "test")
    ds = load_dataset(source, language, split=_HUB_SPLITS[split], what=f"data.{split}")
    return [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": _label(r["label"], source)}
            for r in ds]


def encode(tokenizer, examples: list[dict], max_seq_length: int) -> list[dict]:
    """Tokenised pairs (premise, hypothesis), truncated to ``max_seq_length`` (longest first), with labels."""
    enc = tokenizer([e["premise"] for e in examples], [e["hypothesis"] for e in examples], truncation=True,
                    max_length=max_seq_length)
    return [{**{k: enc[k][i] for k in enc.keys()}, "labels": e["label"]} for i, e in enumerate(examples)]


def collator(tokenizer):
    """Pad a list of ``encode`` features into ``[B, T]`` tensors plus ``labels`` ``[B]``, on the right whatever the
    tokenizer's ``padding_side`` (BERT numbers positions 0..T-1 whatever the padding)."""
    def collate(features: list[dict]) -> dict:
        labels = torch.tensor([f["labels"] for f in features])
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              padding_side="right", return_tensors="pt")
        return {**batch, "labels": labels}
    return collate


@torch.no_grad()
def predict(model, features: list[dict], collate, batch_size: int) -> list[int]:
    """Predicted label ids of ``features``."""
    model.eval()
    device = device_of(model)
    out = []
    for batch in batches(features, batch_size, collate):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out += model(**batch).logits.argmax(-1).tolist()
    return out


def accuracy(predictions: list[int], examples: list[dict]) -> float:
    """Percent of ``predictions`` equal to the examples' labels."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    return 100.0 * sum(p == e["label"] for p, e in zip(predictions, examples)) / len(examples)


def run(cfg: dict, model_path: str, out_dir: str | Path | None = None, log=print) -> dict:
    """Fine-tune and test over every seed and language of ``cfg`` (``train/configs/eval_xnli.yaml``).

    Args:
        cfg: the task config (data sources, languages, seeds, hyper-parameters).
        model_path: hub name or folder of the encoder to evaluate.
        out_dir: where predictions per seed and language go (``predictions/SEED/LANG.txt``); None: nowhere.
        log: progress messages.

    Returns:
        The ``report.aggregate`` result with accuracy per language in percent.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tcfg = TrainConfig.from_dict(cfg)
    source, hub_kwargs = model_source(model_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    collate = collator(tokenizer)
    data = cfg["data"]
    train_lang = cfg.get("train_language", "en")
    limit = cfg.get("max_train_examples")
    train = load_nli(data["train"], "train", train_lang)[:limit]
    dev = encode(tokenizer, load_nli(data["dev"], "dev", train_lang), cfg["max_seq_length"])
    tests = {lang: load_nli(data["test"], "test", lang) for lang in cfg["languages"]}
    log(f"xnli: {len(train)} training examples, {len(dev)} dev, test " +
        ", ".join(f"{k}={len(v)}" for k, v in tests.items()))
    train_features = encode(tokenizer, train, cfg["max_seq_length"])
    test_features = {lang: encode(tokenizer, ex, cfg["max_seq_length"]) for lang, ex in tests.items()}
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    bs = cfg.get("eval_batch_size", 64)
    per_seed, runs = [], []
    for seed in cfg["seeds"]:
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(LABELS),
                                                                   **hub_kwargs).to(device)

        def dev_accuracy(model=model):
            return accuracy(predict(model, dev, collate, bs), [{"label": f["labels"]} for f in dev])

        info = finetune(model, train_features, collate, tcfg, seed=seed, evaluate=dev_accuracy, log=log)
        scores = {}
        for lang, feats in test_features.items():
            preds = predict(model, feats, collate, bs)
            scores[lang] = {"accuracy": accuracy(preds, tests[lang])}
            if out_dir is not None:
                path = Path(out_dir) / "predictions" / str(seed) / f"{lang}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(f"{LABELS[p]}\n" for p in preds))
        log(f"seed {seed}: dev {info['best_score']:.2f} (update {info['best_update']}); " +
            ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in scores.items()))
        per_seed.append(scores)
        runs.append(info)
        del model
    return aggregate("xnli", per_seed, cfg["seeds"], cfg.get("seen_languages", []), model=str(model_path),
                     train_runs=runs, config=cfg)
