"""Task fine-tuning shared by XNLI and XQuAD: the loop of XTREME's ``run_classify.py`` / ``run_squad.py``.

AdamW (weight decay off for biases and LayerNorm weights), a linear warm-up then linear decay to 0 over
all updates, gradient accumulation, gradient-norm clipping, optional bf16 autocast on CUDA, and, when an
``evaluate`` callback is given, evaluation every ``eval_steps`` updates and at the end with the best
parameters kept (XTREME's ``--eval_all_checkpoints --save_only_best_checkpoint`` on the English dev set).

An update always averages exactly ``grad_accumulation`` micro-batches, counted across epochs: when an epoch's
batches do not divide evenly, one update spans the end of an epoch and the start of the next (XTREME adds
that epoch's leftover gradients to the next epoch's first update instead, which then sums more micro-batches).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TRAIN_KEYS = ("learning_rate", "epochs", "batch_size", "grad_accumulation", "weight_decay", "adam_epsilon",
              "max_grad_norm", "warmup_steps", "eval_steps", "precision", "max_steps")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (the keys of ``train/configs/eval_*.yaml``).

    Attributes:
        learning_rate: peak learning rate of AdamW.
        epochs: passes over the training features (may be fractional, as XTREME's 2.0 / 3.0).
        batch_size: features per forward pass; an update sees ``batch_size * grad_accumulation``.
        grad_accumulation: forward passes per update.
        weight_decay, adam_epsilon: AdamW's.
        max_grad_norm: clipping of the global gradient norm (<= 0: off).
        warmup_steps: updates of linear warm-up.
        eval_steps: evaluate every so many updates (<= 0: only at the end).
        precision: "fp32" or "bf16" (autocast, CUDA only).
        max_steps: stop after so many updates (<= 0: no limit; for smoke tests).
    """

    learning_rate: float
    epochs: float
    batch_size: int
    grad_accumulation: int = 1
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    eval_steps: int = 0
    precision: str = "fp32"
    max_steps: int = 0

    @classmethod
    def from_dict(cls, cfg: dict) -> "TrainConfig":
        """Pick the training keys out of a task config; unknown precision or bad sizes are a ValueError."""
        out = cls(**{k: cfg[k] for k in TRAIN_KEYS if k in cfg})
        if out.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {out.precision!r}")
        for name in ("batch_size", "grad_accumulation"):
            if not isinstance(getattr(out, name), int) or getattr(out, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(out, name)!r}")
        for name in ("learning_rate", "epochs", "weight_decay", "adam_epsilon", "max_grad_norm"):
            value = getattr(out, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not out.learning_rate > 0 or not out.epochs > 0:
            raise ValueError(f"learning_rate and epochs must be > 0, got {out.learning_rate}, {out.epochs}")
        return out


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def batches(features: Sequence[dict], batch_size: int, collate: Callable[[list[dict]], dict],
            order: Sequence[int] | None = None):
    """Collated batches of ``features`` in ``order`` (default: as given)."""
    order = range(len(features)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield collate([features[i] for i in order[start:start + batch_size]])


def finetune(model: torch.nn.Module, features: Sequence[dict], collate: Callable[[list[dict]], dict],
             cfg: TrainConfig, *, seed: int, evaluate: Callable[[], float] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune ``model`` in place on ``features``; with ``evaluate``, end on its best parameters.

    Args:
        model: a Hugging Face model with a task head whose output has ``.loss`` given labels.
        features: training features; ``collate`` turns a list of them into the model's keyword arguments
            (tensors ``[B, T]`` with the labels included).
        cfg: hyper-parameters.
        seed: shuffling seed (the model's initialisation is the caller's).
        evaluate: returns a score to maximise (e.g. English dev accuracy); called every ``eval_steps``
            updates and at the end.
        log: progress messages.

    Returns:
        ``{"updates": n, "best_score": s or None, "best_update": u or None, "final_loss": l}``.
    """
    if not features:
        raise ValueError("no training features")
    device = device_of(model)
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accumulation))
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    best = {"score": None, "update": None, "state": None}

    def checkpoint(update: int) -> None:
        if evaluate is None:
            return
        score = evaluate()
        model.train()
        log(f"update {update}/{total}: dev score {score:.4f}")
        if best["score"] is None or score > best["score"]:
            best.update(score=score, update=update,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    model.train()
    update = micro = 0
    loss_value = float("nan")
    while update < total:
        order = torch.randperm(len(features), generator=gen).tolist()
        for batch in batches(features, cfg.batch_size, collate, order):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            (loss / cfg.grad_accumulation).backward()
            loss_value = float(loss.detach())
            micro += 1
            if micro % cfg.grad_accumulation:
                continue
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            update += 1
            if cfg.eval_steps > 0 and update % cfg.eval_steps == 0 and update < total:
                checkpoint(update)
            if update >= total:
                break
    checkpoint(update)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"updates": update, "best_score": best["score"], "best_update": best["update"], "final_loss": loss_value}
