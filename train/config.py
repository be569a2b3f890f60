"""Run configuration: YAML files (``yaml.safe_load``) over defaults, plus ``--section.key value`` overrides.

Every key must exist in ``DEFAULTS`` (a typo is a ``ValueError``, not a silently ignored setting);
numbers are coerced to the default's type, so ``lr: 5e-5`` (a string to YAML 1.1) is a float.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/align",
    "model": {
        "name_or_path": None,       # hub name or folder; None = build the tiny model below
        "tiny": {"vocab_size": 500, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 128, "max_position_embeddings": 64, "dropout": 0.0,
                 "word_embedding_std": None},
        "layer": -1,                # hidden_states index: 0 = embeddings, -1 = last layer
        "word_mode": "last",        # last | first | mean | subword
        "max_length": 128,          # tokens per sentence, special tokens included
    },
    "data": {
        "target_lang": "en",
        "languages": [],            # [{lang, format, ...}], see train.data.load_pairs
        "pairs_per_language": 1000,
        "eval_pairs": 200,          # held out per language, for retrieval before / after
        "min_words": 1,
        "max_words": 64,
        "num_proc": None,           # processes for Moses tokenisation (datasets.map)
    },
    "loss": {
        "granularity": "sentence",  # sentence: one OT problem per sentence pair; batch: all words pooled
        "cost": "sqeuclidean",
        "blur": 0.05,
        "scaling": 0.5,
        "debias": True,
        "backend": "auto",
        "reg_lambda": 1.0,          # lambda * sum ||h - h0||^2 over English tokens (per sentence pair)
    },
    "train": {
        "lr": 5e-5,
        "weight_decay": 0.0,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8,
        "batch_size": 24,           # sentence pairs per language, per process and micro-step
        "grad_accum": 1,
        "epochs": 1,
        "max_steps": None,          # optimizer steps; None = epochs over pairs_per_language
        "warmup_ratio": 0.1,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",    # no | bf16 | fp16 (autocast, on GPU)
        "cpu": False,               # force the CPU even when a GPU is there
        "num_threads": None,        # torch CPU threads per process (None = torch's default)
        "checkpoint_every": 500,    # optimizer steps; 0 = only at the end
        "keep_checkpoints": 2,
        "log_every": 10,
        "resume": True,             # continue from the newest checkpoint in output_dir
        "stop_after_steps": None,   # leave after this many steps of this invocation (checkpointed)
        "retrieval_batch_size": 64,
    },
}

CHOICES = {("model", "word_mode"): ("last", "first", "mean", "subword"),
           ("loss", "granularity"): ("sentence", "batch"),
           ("train", "mixed_precision"): ("no", "bf16", "fp16")}


def _coerce(path: str, value: Any, default: Any) -> Any:
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"config {path} must be a mapping, got {value!r}")
        return _merge(default, value, path)
    if value is None or default is None or isinstance(default, (list, str)):
        return value
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config {path} must be true or false, got {value!r}")
        return value
    try:
        return kind(value) if kind is float else int(str(value), 10)
    except (TypeError, ValueError):
        raise ValueError(f"config {path} must be {kind.__name__}, got {value!r}") from None


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in base:
            raise ValueError(f"unknown config key {path!r} (known: {', '.join(sorted(base))})")
        out[key] = _coerce(path, value, base[key])
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] = (), output_dir: str | None = None
                ) -> dict[str, Any]:
    """Read a run configuration.

    Args:
        path: a YAML file (``yaml.safe_load``) or None for the defaults alone.
        overrides: ``["--train.lr", "1e-3", "--loss.granularity", "batch", ...]``; values are parsed
            with ``yaml.safe_load`` (``null``, ``true``, numbers, lists).
        output_dir: replaces ``output_dir`` when given.

    Returns:
        The full nested configuration dict.

    Raises:
        ValueError: on unknown keys, wrong types, a value outside its choices, or malformed overrides.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        cfg = _merge(cfg, loaded)
    if len(overrides) % 2:
        raise ValueError(f"overrides come as '--key value' pairs, got {list(overrides)}")
    for flag, raw in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"override keys look like --train.lr, got {flag!r}")
        keys = flag[2:].replace("-", "_").split(".")
        update: dict[str, Any] = yaml.safe_load(raw) if raw != "" else ""
        for key in reversed(keys):
            update = {key: update}
        cfg = _merge(cfg, update)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ValueError(f"config {section}.{key} must be one of {allowed}, got {cfg[section][key]!r}")
    if not cfg["data"]["languages"]:
        raise ValueError("config data.languages is empty: name at least one language pair")
    return cfg
