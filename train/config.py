"""Run configuration: YAML files (``yaml.SafeLoader``: no code runs) over defaults, plus ``--section.key value``
overrides.

One loader and one override syntax for both command lines: ``train.align`` (defaults: ``DEFAULTS``)
and ``train.evaluate`` (defaults: the task's shipped config, ``train/configs/eval_TASK.yaml``).
Every key must exist in the defaults (a typo is a ``ValueError``, not a silently ignored setting) and
takes the default's type (``TYPES`` / ``TASK_TYPES`` where the default is None or an empty list, which
shows none): numbers are coerced to it, so ``lr: 5e-5`` (a string to YAML 1.1) is a float, but a boolean
is no number, a scalar no list and ``null`` only allowed where the type says ``X | None``; ``LIMITS`` /
``TASK_LIMITS`` bound the numbers (``train.batch_size`` >= 1, ...), and floats must be finite.
Overrides come as ``--train.lr 1e-4`` or ``--train.lr=1e-4``; values are read as YAML (``null``,
``true``, numbers, ``[1, 2]``). Booleans are YAML 1.2's, ``true`` and ``false`` only: YAML 1.1 also reads
``no``, ``off``, ``yes`` and ``on`` as booleans, which turned ``mixed_precision: no`` (accelerate's own
spelling) into ``False``.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import NoneType
from typing import Any, get_args, get_origin

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
        "check_inputs": True,       # False: no host read for input checks (a step a CUDA graph can capture)
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
        "dropout": False,           # dropout in the trained encoder; see train.align.alignment_loss
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

# The type of each key whose default shows none (None, an empty list); ``X | None``: null is allowed.
TYPES: dict[str, Any] = {"model.name_or_path": str | None, "model.tiny.word_embedding_std": float | None,
                         "data.languages": list[dict], "data.num_proc": int | None, "train.max_steps": int | None,
                         "train.num_threads": int | None, "train.stop_after_steps": int | None}
TASK_TYPES: dict[str, Any] = {"max_train_examples": int | None, "device": str | None}

_RULES: dict[str, Callable[[Any], bool]] = {
    ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0, "in [0, 1]": lambda v: 0 <= v <= 1,
    "two numbers in [0, 1)": lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)}
# The values a number may take beyond its type (a rule of _RULES); one outside is an error before anything runs,
# not a ZeroDivisionError at step 1.
LIMITS = {"model.max_length": ">= 1", "model.tiny.dropout": "in [0, 1]", "model.tiny.word_embedding_std": "> 0",
          "data.pairs_per_language": ">= 1", "data.eval_pairs": ">= 0", "data.min_words": ">= 1",
          "data.max_words": ">= 1", "data.num_proc": ">= 1", "loss.reg_lambda": ">= 0",
          "train.lr": ">= 0", "train.weight_decay": ">= 0", "train.adam_betas": "two numbers in [0, 1)",
          "train.adam_eps": ">= 0", "train.batch_size": ">= 1", "train.grad_accum": ">= 1", "train.epochs": ">= 1",
          "train.max_steps": ">= 0", "train.warmup_ratio": "in [0, 1]", "train.max_grad_norm": "> 0",
          "train.num_threads": ">= 1", "train.checkpoint_every": ">= 0", "train.log_every": ">= 1",
          "train.stop_after_steps": ">= 1", "train.retrieval_batch_size": ">= 1"}
TASK_LIMITS = {"learning_rate": "> 0", "epochs": "> 0", "batch_size": ">= 1", "grad_accumulation": ">= 1",
               "max_seq_length": ">= 1", "doc_stride": ">= 1", "max_query_length": ">= 1", "n_best_size": ">= 1",
               "max_answer_length": ">= 1", "weight_decay": ">= 0", "adam_epsilon": ">= 0", "max_grad_norm": "> 0",
               "eval_batch_size": ">= 1", "max_train_examples": ">= 1"}

CHOICES = {("model", "word_mode"): ("last", "first", "mean", "subword"),
           ("loss", "granularity"): ("sentence", "batch"),
           ("train", "mixed_precision"): ("no", "bf16", "fp16")}


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data, no code runs) with YAML 1.2 booleans (see the module docstring)."""


_BOOL = "tag:yaml.org,2002:bool"
_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SafeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _safe_load(stream: Any) -> Any:
    return yaml.load(stream, Loader=_SafeLoader)  # noqa: S506 (a SafeLoader subclass)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
TASK_DEFAULTS = {task: Path(__file__).parent / "configs" / f"eval_{task}.yaml" for task in ("xnli", "xquad")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Command-line help with every option's default, except where there is none to show (required
    options, None, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class Schema:
    """What a config's keys take beyond their defaults: ``types`` for the keys whose default shows none, ``limits``
    (a rule of ``_RULES``) for numbers."""

    types: dict[str, Any]
    limits: dict[str, str]


ALIGN_SCHEMA = Schema(TYPES, LIMITS)
TASK_SCHEMA = Schema(TASK_TYPES, TASK_LIMITS)


def _kind(path: str, default: Any, schema: Schema) -> Any:
    """The type of a key: ``schema.types``, else the default's (a list default: ``list[its elements' type]``, a
    None default missing from ``schema.types``: anything or null)."""
    if path in schema.types:
        return schema.types[path]
    if default is None:
        return Any | None
    if isinstance(default, list):
        kinds = {type(v) for v in default}
        return list[kinds.pop()] if len(kinds) == 1 else list
    return type(default)


def _scalar(path: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config {path} must be true or false, got {value!r}")
        return value
    if kind in (str, dict):
        if not isinstance(value, kind):
            raise ValueError(f"config {path} must be {'a mapping' if kind is dict else 'a string'}, got {value!r}")
        return value
    if kind not in (int, float):
        return value
    wrong = ValueError(f"config {path} must be {kind.__name__}, got {value!r}")
    if isinstance(value, bool):                         # an int to Python, but true is no learning rate
        raise wrong
    try:
        number = float(value) if kind is float else int(str(value), 10)
    except (TypeError, ValueError):
        raise wrong from None
    if not math.isfinite(number):
        raise ValueError(f"config {path} must be a finite number, got {value!r}")
    return number


def _coerce(path: str, value: Any, default: Any, schema: Schema) -> Any:
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"config {path} must be a mapping, got {value!r}")
        return _merge(default, value, schema, path)
    kind = _kind(path, default, schema)
    if NoneType in get_args(kind):                      # X | None
        if value is None:
            return None
        kind = next(k for k in get_args(kind) if k is not NoneType)
    elif value is None:
        raise ValueError(f"config {path} cannot be null")
    if kind is list or get_origin(kind) is list:
        if not isinstance(value, list):
            raise ValueError(f"config {path} must be a list, got {value!r}")
        element = get_args(kind)[0] if get_args(kind) else object
        value = [_scalar(f"{path}[{i}]", v, element) for i, v in enumerate(value)]
    else:
        value = _scalar(path, value, kind)
    rule = schema.limits.get(path)
    if rule is not None and not _RULES[rule](value):
        raise ValueError(f"config {path} must be {rule}, got {value!r}")
    return value


def _merge(base: dict[str, Any], update: dict[str, Any], schema: Schema, prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in base:
            raise ValueError(f"unknown config key {path!r} (known: {', '.join(sorted(map(str, base)))})")
        out[key] = _coerce(path, value, base[key], schema)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping (``_SafeLoader``: no code runs).

    Raises:
        ValueError: naming the file, if it does not exist, is not valid YAML or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = _safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _yaml_value(text: str) -> Any:
    """An override value: YAML (``null``, ``true``, numbers, lists); YAML 1.1 reads ``1e-4`` as a string, we
    read it as a float."""
    if text == "":
        return ""
    try:
        value = _safe_load(text)
    except yaml.YAMLError:
        return text
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else value


def parse_overrides(args: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["--train.lr", "1e-4", "--loss.granularity=batch"]`` to ``[(["train", "lr"], 1e-4), ...]``.

    Dashes in keys read as underscores (``--train.max-steps`` is ``train.max_steps``).

    Raises:
        ValueError: on a token that is not ``--key`` or a key without its value.
    """
    out = []
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or len(flag) < 3 or flag.startswith("--="):
            raise ValueError(f"overrides look like --train.lr 1e-4 (or --train.lr=1e-4), got {flag!r}")
        if "=" in flag:
            key, raw = flag[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override {flag} needs a value (e.g. {flag} 1e-4)")
            key, raw = flag[2:], args[i + 1]
            i += 2
        out.append((key.replace("-", "_").split("."), _yaml_value(raw)))
    return out


def read_config(path: str | Path | None, overrides: Sequence[str], defaults: dict[str, Any], schema: Schema
                ) -> dict[str, Any]:
    """``defaults``, then the YAML file, then the ``--key value`` overrides, every key checked against the
    defaults and coerced to its type (``_kind``) within its limits (``schema``).

    Raises:
        ValueError: on a missing or malformed file, an unknown key, a wrong type, a value out of its limits
            or a malformed override.
    """
    cfg = copy.deepcopy(defaults)
    if path is not None:
        cfg = _merge(cfg, read_yaml(path), schema)
    for keys, value in parse_overrides(overrides):
        update: Any = value
        for key in reversed(keys):
            update = {key: update}
        cfg = _merge(cfg, update, schema)
    return cfg


def load_task_config(task: str, path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """An evaluation task's config (``train.evaluate xnli|xquad``): ``path`` over the task's shipped
    defaults (``TASK_DEFAULTS``), then the overrides (``--seeds [1] --data.test FILE``)."""
    return read_config(path, overrides, read_yaml(TASK_DEFAULTS[task]), TASK_SCHEMA)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), output_dir: str | None = None
                ) -> dict[str, Any]:
    """Read an alignment run's configuration (``train.align``).

    Args:
        path: a YAML file (``_SafeLoader``) or None for the defaults alone.
        overrides: ``["--train.lr", "1e-3", "--loss.granularity", "batch", ...]`` (``parse_overrides``).
        output_dir: replaces ``output_dir`` when given.

    Returns:
        The full nested configuration dict.

    Raises:
        ValueError: on a missing file, unknown keys, wrong types, a value outside its choices, or
            malformed overrides.
    """
    cfg = read_config(path, overrides, DEFAULTS, ALIGN_SCHEMA)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ValueError(f"config {section}.{key} must be one of {allowed}, got {cfg[section][key]!r}")
    if not cfg["data"]["languages"]:
        raise ValueError("config data.languages is empty: name at least one language pair")
    return cfg
