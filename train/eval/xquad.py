"""XQuAD zero-shot transfer: fine-tune a QA head on SQuAD v1.1 (English), test every XQuAD language.

Preprocessing and post-processing follow BERT's / XTREME's ``run_squad.py``:

- the question is cut to ``max_query_length`` tokens; the context is split into windows of at most
  ``max_seq_length`` tokens (question and special tokens included) whose starts are ``doc_stride``
  tokens apart;
- a training window that does not contain the whole (first) answer points both positions at [CLS];
- at test time the answer is the span (start <= end, at most ``max_answer_length`` tokens, inside the
  context, starting at a token whose window gives it maximal context) with the best
  start_logit + end_logit among the ``n_best_size`` best starts and ends of each window; its text is
  the context slice between the character offsets of its first and last token.

Data: a hub name (``load_dataset("squad", split="train")``, ``load_dataset("xquad", "xquad.LANG",
split="validation")``) or local SQuAD v1.1 JSON files (a test path may hold ``{lang}``, as
``xquad.{lang}.json`` in the XQuAD repository).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..hub import load_dataset, model_source
from . import squad
from .finetune import TrainConfig, device_of, finetune, set_seed
from .report import aggregate
from .xnli import is_local

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def load_qa(source: str, split: str, language: str | None = None) -> list[dict]:
    """Flat question records (``squad.to_records``' schema) from a hub data set or a local JSON file.

    Args:
        source: ``"squad"``, ``"xquad"`` (config ``xquad.LANG``) or a local path (``{lang}`` substituted).
        split: the hub split ("train", "validation").
        language: the XQuAD language, for ``{lang}`` and the hub config.
    """
    lang = language or "en"
    if is_local(source, lang):
        return squad.to_records(squad.load_squad_file(source.replace("{lang}", lang)))
    config = f"{source}.{language}" if source == "xquad" else None
    ds = load_dataset(source, config, split=split, what="data.train" if split == "train" else "data.test")
    return [{"id": r["id"], "title": r.get("title", ""), "context": r["context"], "question": r["question"],
             "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}}
            for r in ds]


def _truncate_question(tokenizer, question: str, max_query_length: int) -> str:
    question = question.lstrip()
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_length:
        return question
    return question[:enc["offset_mapping"][max_query_length - 1][1]]


def qa_features(tokenizer, records: list[dict], *, max_seq_length: int, doc_stride: int, max_query_length: int,
                train: bool) -> list[dict]:
    """Sliding-window features of question records.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        records: flat question records.
        max_seq_length, doc_stride, max_query_length: window length, step between window starts, question cut.
        train: add ``start_positions`` / ``end_positions`` (the first gold answer; [CLS] when outside).

    Returns:
        One dict per window with the model inputs, ``example`` (index into ``records``), ``offsets``
        (character span per token, None outside the context) and ``max_context`` (per token, whether this
        window gives it the most context among the windows of its example).
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: XQuAD's answer spans need a fast one "
                         "(character offsets)")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    features: list[dict] = []
    for idx, rec in enumerate(records):
        question = _truncate_question(tokenizer, rec["question"], max_query_length)
        q_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        budget = max_seq_length - q_len - specials
        if budget < 1:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for context after a "
                             f"{q_len}-token question")
        enc = tokenizer(question, rec["context"], truncation="only_second", max_length=max_seq_length,
                        stride=max(0, budget - doc_stride), return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        first = len(features)
        for w in range(len(enc["input_ids"])):
            seq = enc.sequence_ids(w)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq)]
            feat = {k: enc[k][w] for k in _MODEL_KEYS if k in enc}
            feat.update(example=idx, offsets=offsets)
            if train:
                feat.update(zip(("start_positions", "end_positions"), _answer_positions(tokenizer, rec, feat)))
            features.append(feat)
        _mark_max_context(features[first:])
    return features


def _answer_positions(tokenizer, rec: dict, feat: dict) -> tuple[int, int]:
    cls = feat["input_ids"].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in feat["input_ids"] else 0
    if not rec["answers"]["text"]:
        return cls, cls
    start_char = rec["answers"]["answer_start"][0]
    end_char = start_char + len(rec["answers"]["text"][0])
    ctx = [i for i, o in enumerate(feat["offsets"]) if o is not None]
    if feat["offsets"][ctx[0]][0] > start_char or feat["offsets"][ctx[-1]][1] < end_char:
        return cls, cls
    start = next(i for i in ctx if feat["offsets"][i][1] > start_char)
    end = next(i for i in reversed(ctx) if feat["offsets"][i][0] < end_char)
    return start, end


def _mark_max_context(windows: list[dict]) -> None:
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for w, feat in enumerate(windows):
        ctx = [i for i, o in enumerate(feat["offsets"]) if o is not None]
        for j, i in enumerate(ctx):
            score = min(j, len(ctx) - 1 - j) + 0.01 * len(ctx)
            key = feat["offsets"][i]
            if key not in best or score > best[key][0]:
                best[key] = (score, w)
    for w, feat in enumerate(windows):
        feat["max_context"] = [o is not None and best[o][1] == w for o in feat["offsets"]]


def collator(tokenizer):
    """Pad model inputs to ``[B, T]`` tensors (with start/end positions ``[B]`` when present), on the right
    whatever the tokenizer's ``padding_side`` (BERT numbers positions 0..T-1 whatever the padding)."""
    def collate(features: list[dict]) -> dict:
        batch = tokenizer.pad([{k: f[k] for k in _MODEL_KEYS if k in f} for f in features], padding_side="right",
                              return_tensors="pt")
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return dict(batch)
    return collate


@torch.no_grad()
def predict_logits(model, features: list[dict], collate, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(start_logits [T], end_logits [T])`` per feature, unpadded."""
    model.eval()
    device = device_of(model)
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if k in _MODEL_KEYS}
        res = model(**batch)
        for b, f in enumerate(chunk):
            real = batch["attention_mask"][b].bool()  # the feature's own tokens, wherever the padding went
            out.append((res.start_logits[b, real].float().cpu().numpy(), res.end_logits[b, real].float().cpu().numpy()))
    return out


def postprocess(records: list[dict], features: list[dict], logits: list[tuple[np.ndarray, np.ndarray]], *,
                n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best answer text per question (module docstring); "" when no valid span exists."""
    if len(features) != len(logits):
        raise ValueError(f"{len(logits)} logit pairs for {len(features)} features")
    best: dict[int, tuple[float, str]] = {}
    for feat, (start_logits, end_logits) in zip(features, logits):
        rec = records[feat["example"]]
        offsets, maxc = feat["offsets"], feat["max_context"]
        starts = np.argsort(start_logits)[::-1][:n_best_size]
        ends = np.argsort(end_logits)[::-1][:n_best_size]
        for s in starts:
            if offsets[s] is None or not maxc[s]:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if feat["example"] not in best or score > best[feat["example"]][0]:
                    best[feat["example"]] = (score, rec["context"][offsets[s][0]:offsets[e][1]])
    return {rec["id"]: best[i][1] if i in best else "" for i, rec in enumerate(records)}


def run(cfg: dict, model_path: str, out_dir: str | Path | None = None, log=print) -> dict:
    """Fine-tune on SQuAD and test every XQuAD language, for every seed of ``cfg`` (``eval_xquad.yaml``).

    Args:
        cfg: the task config.
        model_path: hub name or folder of the encoder to evaluate.
        out_dir: where predictions go (``predictions/SEED/LANG.json``, scorable by ``score-squad``).
        log: progress messages.

    Returns:
        The ``report.aggregate`` result with F1 and exact match per language in percent.
    """
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tcfg = TrainConfig.from_dict(cfg)
    source, hub_kwargs = model_source(model_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    collate = collator(tokenizer)
    data = cfg["data"]
    win = {k: cfg[k] for k in ("max_seq_length", "doc_stride", "max_query_length")}
    train = load_qa(data["train"], "train")[:cfg.get("max_train_examples")]
    train_features = qa_features(tokenizer, train, train=True, **win)
    if is_local(data["test"], "en") and "{lang}" not in data["test"] and len(cfg["languages"]) > 1:
        raise ValueError(f"data.test {data['test']} is one local file, for {len(cfg['languages'])} languages: every "
                         "language would be scored on its questions; give a file per language, with {lang} in its "
                         "path (e.g. /data/xquad/xquad.{lang}.json), or one language (--languages [de])")
    tests = {lang: load_qa(data["test"], "validation", lang) for lang in cfg["languages"]}
    test_features = {lang: qa_features(tokenizer, recs, train=False, **win) for lang, recs in tests.items()}
    log(f"xquad: {len(train)} training questions ({len(train_features)} windows), test " +
        ", ".join(f"{k}={len(v)}" for k, v in tests.items()))
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    bs = cfg.get("eval_batch_size", 64)
    per_seed = []
    for seed in cfg["seeds"]:
        set_seed(seed)
        model = AutoModelForQuestionAnswering.from_pretrained(source, **hub_kwargs).to(device)
        finetune(model, train_features, collate, tcfg, seed=seed, log=log)
        scores = {}
        for lang, recs in tests.items():
            preds = postprocess(recs, test_features[lang], predict_logits(model, test_features[lang], collate, bs),
                                n_best_size=cfg.get("n_best_size", 20),
                                max_answer_length=cfg.get("max_answer_length", 30))
            scores[lang] = squad.score(((r["id"], r["answers"]["text"]) for r in recs), preds, warn=None)
            if out_dir is not None:
                path = Path(out_dir) / "predictions" / str(seed) / f"{lang}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(preds, ensure_ascii=False, indent=1))
        log(f"seed {seed}: " + ", ".join(f"{k} F1 {v['f1']:.1f} EM {v['exact_match']:.1f}" for k, v in scores.items()))
        per_seed.append({lang: {"f1": s["f1"], "exact_match": s["exact_match"]} for lang, s in scores.items()})
        del model
    return aggregate("xquad", per_seed, cfg["seeds"], cfg.get("seen_languages", []), model=str(model_path),
                     config=cfg)
