"""OT alignment fine-tuning of a multilingual encoder (Alqahtani et al., Findings of EMNLP 2021).

    ./dev python -m train.align --config train/configs/tiny.yaml [--section.key value ...] [--output-dir DIR]
    accelerate launch -m train.align --config train/configs/paper_wordot.yaml      # DDP, many GPUs

Per step and language pair (source, English): the words of both sides go through the encoder, each
word is one vector of the aligned layer (its last sub-word by default), and the loss is

    mean over pairs of  S_eps(source words, English words)         (otfast.SinkhornLoss, debiased)
    + lambda * sum over English tokens ||h(t) - h0(t)||^2 / P    (h0: the frozen initial encoder)

with P the sentence pairs of the micro-batch (all languages) and S_eps one OT problem per sentence
pair (``loss.granularity: sentence``, averaged over the pairs of a language) or one over all the words
of the batch (``batch``). The regulariser is Cao et al.'s L2 term, a function of the weights alone: h and
h0 are the same function of the same input, so it is 0 at step 0 and measures the drift of the English
representations since. The encoder trains without dropout by default (``train.dropout: false``, both
encoders in eval mode); with ``train.dropout: true`` the frozen copy runs with the same dropout masks
as the trained one. (Dropout in the trained encoder alone made the term measure dropout noise: 137 at
step 1 of the README's all-MiniLM-L6-v2 run, four times the OT term.) AdamW, linear warm-up and decay,
gradient accumulation and clipping, autocast, ``accelerate`` for DDP.

Output folder: ``metrics.csv`` and ``tensorboard/`` (training curves; a resume drops the rows logged
after its checkpoint, so no step repeats), ``data_report.json``, ``run_config.json`` (the settings that
ran), ``checkpoints/step-N/`` (safetensors model, optimiser, scheduler, per-process RNG, data position,
settings; written to a temporary folder and renamed, so a crash never leaves half a checkpoint; the run
resumes from the newest usable one, which must hold the same settings but for the ``RUN_CONTROL`` keys,
and falls back to the one before when it is damaged; ``train.resume: false`` starts over, removing the
earlier run's files), ``model/`` (``save_pretrained`` model and tokenizer) and ``metrics.json`` with
``retrieval_before`` / ``retrieval_after`` (held-out pairs, mean of both directions, averaged over
languages) and the per-language details.

SIGINT / SIGTERM during training: a checkpoint at the end of the current step, one line, exit status
128 + the signal (130 / 143); a second signal exits at once. The same command then resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from safetensors.torch import load_model, save_model

import otfast

from . import OPENMP_SPINS
from .config import DEFAULTS, HelpFormatter, load_config
from .data import DataReport, LanguageData, batch_indices, load_pairs, prepare_language
from .modeling import (build_tiny_model, encode_words, layer_states, load_encoder, position_limit, token_check,
                       word_embeddings)
from .retrieval import evaluate_retrieval

CHECKPOINT_DIR = re.compile(r"step-(\d+)")
# The keys that steer one invocation, not the run's trajectory (what is computed at each step): a resume may
# change them. Any other key must equal the checkpoint's, or the optimiser and scheduler state, the data position
# and the initial model of one run would go on under the settings of another.
RUN_CONTROL = ("output_dir", "data.num_proc", "loss.check_inputs", "train.resume", "train.stop_after_steps",
               "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")
# What a run writes in its output folder (and init_model/ when it builds the tiny model): a fresh start removes it.
RUN_FILES = ("model", "metrics.json", "metrics.csv", "tensorboard", "data_report.json", "run_config.json")


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint; ``exit_code`` is 128 + the signal.
    The message is empty on all but the main process (one line per run, not per process)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Split the command line into ``--config`` / ``--output-dir`` and ``--section.key value`` overrides."""
    parser = argparse.ArgumentParser(prog="./dev python -m train.align", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="Any other '--section.key value' pair overrides the config (every key "
                                            "is listed in train/config.py), e.g. --train.lr 1e-4 "
                                            "--loss.granularity batch.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. train/configs/tiny.yaml")
    parser.add_argument("--output-dir", default=None, help="output folder (default: the config's output_dir)")
    return parser.parse_known_args(argv)


def load_raw(cfg: dict[str, Any], base_dir: Path) -> list[tuple[datasets.Dataset, DataReport]]:
    """Read every language pair of the config (``train.data.load_pairs``)."""
    return [load_pairs(spec, cfg["data"]["target_lang"], base_dir) for spec in cfg["data"]["languages"]]


def prepare_data(cfg: dict[str, Any], raw: list[tuple[datasets.Dataset, DataReport]], check=None
                 ) -> list[LanguageData]:
    """Prepare every language pair (same result on every process); ``check`` as in ``prepare_language``."""
    d = cfg["data"]
    return [prepare_language(dataset, copy.deepcopy(report), pairs_per_language=d["pairs_per_language"],
                             eval_pairs=d["eval_pairs"], min_words=d["min_words"], max_words=d["max_words"],
                             target_lang=d["target_lang"], seed=cfg["seed"], num_proc=d["num_proc"], check=check)
            for dataset, report in raw]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def total_steps(cfg: dict[str, Any], num_processes: int) -> int:
    """Optimizer steps of the whole run (``train.max_steps``, else ``train.epochs`` over the pairs).

    Raises:
        ValueError: if that is no step at all.
    """
    t = cfg["train"]
    per_epoch = cfg["data"]["pairs_per_language"] // (t["batch_size"] * num_processes)
    total = t["max_steps"] if t["max_steps"] is not None else t["epochs"] * per_epoch // t["grad_accum"]
    if total < 1 or per_epoch < 1:
        raise ValueError(f"no optimizer step to run: {cfg['data']['pairs_per_language']} pairs per language, "
                         f"batch {t['batch_size']} x {num_processes} processes x accumulation {t['grad_accum']}")
    return total


def alignment_loss(model, reference, tokenizer, languages: list[LanguageData], indices: list[list[int]],
                   cfg: dict[str, Any], ot_loss: otfast.SinkhornLoss, device: torch.device, autocast
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch: OT per language pair plus the English-side regulariser.

    Args:
        model: the encoder being trained (possibly DDP-wrapped).
        reference: the frozen initial encoder (h0), in the model's mode: in train mode (dropout on) it
            runs on the whole batch from the RNG state the model started from, so both draw the same
            dropout masks.
        tokenizer: the tokenizer.
        languages: the prepared language pairs.
        indices: per language, the training-pair indices of this micro-batch (``batch_indices``).
        cfg: the run configuration.
        ot_loss: the ``otfast.SinkhornLoss``.
        device: where the model is.
        autocast: a context-manager factory (``accelerator.autocast``).

    Returns:
        ``(loss, parts)``: the scalar loss and ``{"ot_<lang>": ..., "reg": ...}`` floats for logging.
    """
    m = cfg["model"]
    sources = [languages[k].train[i][0].split() for k in range(len(languages)) for i in indices[k]]
    targets = [languages[k].train[i][1].split() for k in range(len(languages)) for i in indices[k]]
    batch = {k: v.to(device) for k, v in encode_words(tokenizer, targets + sources, m["max_length"]).items()}
    n_tgt = len(targets)
    with autocast():
        if reference.training:  # dropout on: the frozen copy draws the same masks from the same RNG state
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                h = layer_states(model, batch, m["layer"])
            with torch.no_grad():
                h0 = layer_states(reference, batch, m["layer"])[:n_tgt]
        else:
            h = layer_states(model, batch, m["layer"])
            with torch.no_grad():  # English rows only; same padded length, so h0 == h bitwise at step 0
                h0 = layer_states(reference, {k: v[:n_tgt] for k, v in batch.items()}, m["layer"])
    h = h.float()
    x, mask = word_embeddings(h, batch["word_ids"], m["word_mode"])
    parts: dict[str, float] = {}
    total = h.new_zeros(())
    start = 0
    for lang, idx in zip(languages, indices):
        b = len(idx)
        t_rows, s_rows = slice(start, start + b), slice(n_tgt + start, n_tgt + start + b)
        start += b
        xs, ms, xt, mt = x[s_rows], mask[s_rows], x[t_rows], mask[t_rows]
        if cfg["loss"]["granularity"] == "batch":
            xs, xt = xs[ms].unsqueeze(0), xt[mt].unsqueeze(0)
            ms = mt = None
        value = ot_loss(xs, xt, ms, mt)
        parts[f"ot_{lang.lang}"] = value.item()
        total = total + value
    english = (batch["word_ids"][:n_tgt] >= 0).unsqueeze(-1)
    reg = ((h[:n_tgt] - h0.float()) ** 2 * english).sum() / n_tgt
    parts["reg"] = reg.item()
    return total + cfg["loss"]["reg_lambda"] * reg, parts


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))


def checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """``(N, folder/checkpoints/step-N)`` for every folder named ``step-<digits>``, oldest first (anything else
    there, such as ``step-20.bak`` or ``step-old``, is not a checkpoint and is left alone)."""
    matches = [(CHECKPOINT_DIR.fullmatch(p.name), p) for p in (folder / "checkpoints").glob("step-*")]
    return sorted((int(m.group(1)), p) for m, p in matches if m and p.is_dir())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, accelerator: Accelerator, model, optimizer, scheduler, state: dict[str, Any],
                    keep: int, cfg: dict[str, Any]) -> None:
    """Write ``folder/checkpoints/step-N`` (N = ``state["step"]``) atomically, then prune.

    Plain state only: the model as safetensors, optimiser / scheduler / grad-scaler state dicts and
    per-process RNG states with ``torch.save`` (tensors, numbers, lists), the trainer state and the run's
    configuration ``cfg`` (``run_config.json``, which a resume must match) as JSON. Every
    file goes to ``.step-N.tmp``, is flushed to disk, and the folder is renamed to ``step-N``: a crash at
    any point leaves the previous checkpoints as they were. Then checkpoints of steps after N (left by an
    abandoned or damaged timeline) are removed, and all but the newest ``keep`` (``keep`` <= 0: all kept).
    """
    root = folder / "checkpoints"
    step = state["step"]
    final, tmp, old = root / f"step-{step}", root / f".step-{step}.tmp", root / f".step-{step}.old"
    if accelerator.is_main_process:
        for stale in root.glob(".step-*"):                # what an earlier crash mid-save left
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "run_config.json").write_text(json.dumps(cfg, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
        kept = [p for n, p in checkpoint_dirs(folder) if n <= step]
        for n, path in checkpoint_dirs(folder):
            if n > step or (keep > 0 and path in kept[:-keep]):
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def _problem(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _file(path: Path, use):
    """``use(path)``, with any failure turned into a ``CheckpointError`` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return use(path)
    except Exception as exc:  # a damaged file can fail in any way (pickle, safetensors, json, shapes)
        raise CheckpointError(f"{path} is unusable ({_problem(exc)})") from None


def _json_object(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _trainer_state(path: Path, step: int) -> dict[str, Any]:
    state = _json_object(path)
    for key, kinds in (("step", int), ("num_processes", int), ("elapsed", (int, float)),
                       ("retrieval_before", dict)):
        if key not in state:
            raise ValueError(f"no '{key}'")
        if not isinstance(state[key], kinds) or isinstance(state[key], bool):
            raise ValueError(f"'{key}' is {state[key]!r}")
    if state["step"] != step:
        raise ValueError(f"says step {state['step']}, its folder says {step}")
    return state


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 5e-5, "data.languages": [...], ...}``: one entry per config key (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_file(checkpoint: Path) -> Path:
    """The ``run_config.json`` a checkpoint was written with: its own, or for one written before checkpoints held
    their settings, its run folder's (which that run wrote as it started)."""
    own = checkpoint / "run_config.json"
    return own if own.exists() else checkpoint.parent.parent / "run_config.json"


def check_settings(source: Path, cfg: dict[str, Any]) -> None:
    """Stop unless the ``run_config.json`` ``source`` (of a checkpoint, or of a run folder) holds the settings of
    ``cfg``, ``RUN_CONTROL`` keys aside; a key it lacks (written before the key existed) counts as its default.

    Raises:
        CheckpointError: if ``source`` is missing or damaged.
        ValueError: listing every key that differs, as ``key old -> new``.
    """
    saved, now = _flat(_file(source, _json_object)), _flat(json.loads(json.dumps(cfg)))
    defaults, absent = _flat(json.loads(json.dumps(DEFAULTS))), object()

    def shown(value: Any) -> str:
        return "(absent)" if value is absent else json.dumps(value)

    differ = [f"{key} {shown(saved.get(key, defaults.get(key, absent)))} -> {shown(now.get(key, absent))}"
              for key in sorted(saved.keys() | now.keys())
              if key not in RUN_CONTROL and saved.get(key, defaults.get(key, absent)) != now.get(key, absent)]
    if differ:
        raise ValueError(f"{source.parent} was written with other settings: {', '.join(differ)}; resume with that "
                         f"run's settings ({source}; only {', '.join(RUN_CONTROL)} may change), or start over in a "
                         "new --output-dir or with --train.resume false (which removes that run)")


def restore_checkpoint(path: Path, step: int, accelerator: Accelerator, model, optimizer, scheduler,
                       cfg: dict[str, Any]) -> dict[str, Any]:
    """Load what ``save_checkpoint`` wrote (``torch.load(weights_only=True)``, safetensors); returns the trainer
    state.

    Raises:
        CheckpointError: naming the file that is missing or damaged (the model may then be half loaded:
            restore another checkpoint or stop).
        ValueError: if the checkpoint was written by a different number of processes or with other settings
            than ``cfg`` (``check_settings``).
    """
    state = _file(path / "trainer_state.json", lambda p: _trainer_state(p, step))
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}: resume with as many processes (the data position depends "
                         "on it), or start again in a new --output-dir")
    check_settings(settings_file(path), cfg)

    def tensors(p: Path):
        return torch.load(p, weights_only=True, map_location="cpu")

    _file(path / "model.safetensors", lambda p: load_model(accelerator.unwrap_model(model), str(p)))  # copied in place
    _file(path / "optimizer.pt", lambda p: optimizer.load_state_dict(tensors(p)))
    _file(path / "scheduler.pt", lambda p: scheduler.load_state_dict(tensors(p)))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        _file(path / "scaler.pt", lambda p: accelerator.scaler.load_state_dict(tensors(p)))
    _file(path / f"rng-{accelerator.process_index}.pt", lambda p: _set_rng_state(tensors(p)))
    return state


def resume(out: Path, accelerator: Accelerator, model, optimizer, scheduler, cfg: dict[str, Any]
           ) -> dict[str, Any] | None:
    """Restore the newest usable checkpoint of ``out``; None when there is no checkpoint at all.

    A damaged one is reported in one line naming the file and the problem, and the one before is tried
    (every process must be able to use it).

    Raises:
        ValueError: when checkpoints exist but none is usable, or they come from another process count or
            other settings than ``cfg``.
    """
    found = checkpoint_dirs(out)
    for step, path in reversed(found):
        try:
            state, problem = restore_checkpoint(path, step, accelerator, model, optimizer, scheduler, cfg), None
        except CheckpointError as exc:
            state, problem = None, str(exc)
        every = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
        problems = [p for p in every if p]
        if not problems:
            return state
        for line in dict.fromkeys(problems):
            accelerator.print(f"checkpoint {line}: skipping step-{step}", file=sys.stderr)
    if found:
        raise ValueError(f"no usable checkpoint in {out / 'checkpoints'} (see above): move the damaged ones away, "
                         "or pass --train.resume false (or a new --output-dir) to start over")
    return None


class MetricsLog:
    """Training curves to ``metrics.csv`` and TensorBoard (main process only).

    Opening the log at step k (a fresh run: 0) drops the rows of later steps that an interrupted run left
    (and TensorBoard's events after k), so no step is ever logged twice.
    """

    def __init__(self, folder: Path, enabled: bool, start_step: int):
        self.enabled, self.folder, self.writer = enabled, folder, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._truncate(start_step)
            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)

    def _truncate(self, step: int) -> None:
        path = self.folder / "metrics.csv"
        if not path.is_file():
            return
        if step == 0:
            path.unlink()
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)
        os.replace(tmp, path)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one row (columns fixed by the first row written) and the TensorBoard scalars."""
        if not self.enabled:
            return
        path = self.folder / "metrics.csv"
        fresh = not path.is_file()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *values])
            if fresh:
                writer.writeheader()
            writer.writerow({"step": step, **values})
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


class StopSignals:
    """SIGINT and SIGTERM while training: the first asks for a checkpoint at the next step boundary, a
    second exits at once (status 128 + signal) without saving.

    A repeat within ``REPEAT_AFTER_S`` of the first is the same request delivered twice, not a second one:
    Ctrl-C or a scheduler signals every process of the group, and a launcher (torchrun, ``accelerate
    launch``) forwards what it receives to its workers at once. Used as a context manager around the
    training loop (the previous handlers come back after it); ``requested()`` is the signal number every
    process agrees on (one all-gather per step under DDP), or 0.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_AFTER_S = 3.0

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received = 0
        self.received_at = 0.0
        self.previous: dict[int, Any] = {}

    def _write(self, line: str) -> None:
        if self.accelerator.is_main_process:
            os.write(2, f"\n{line}\n".encode())           # safe inside a signal handler, unlike print

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            if time.monotonic() - self.received_at < self.REPEAT_AFTER_S:
                return
            self._write(f"{name} again: exiting now without saving (the last checkpoint is kept)")
            os._exit(128 + signum)
        self.received, self.received_at = signum, time.monotonic()
        self._write(f"{name} received: saving a checkpoint after this step, then stopping "
                    f"(send it again, {self.REPEAT_AFTER_S:.0f} s or more later, to exit at once)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> int:
        """The signal received by any process (the largest number), or 0."""
        if self.accelerator.num_processes == 1:
            return self.received
        flags = self.accelerator.gather(torch.tensor([self.received], device=self.accelerator.device))
        return int(flags.max())


def retrieval(model, tokenizer, languages: list[LanguageData], cfg: dict[str, Any]) -> dict[str, Any]:
    """Held-out retrieval accuracy per language and its mean over languages (``mean`` of both directions)."""
    per_lang = {}
    for lang in languages:
        if lang.held_out:
            src, tgt = zip(*lang.held_out)
            per_lang[lang.lang] = evaluate_retrieval(
                model, tokenizer, list(src), list(tgt), layer=cfg["model"]["layer"],
                batch_size=cfg["train"]["retrieval_batch_size"], max_length=cfg["model"]["max_length"])
    mean = float(np.mean([r["mean"] for r in per_lang.values()])) if per_lang else float("nan")
    return {"mean": mean, "by_language": per_lang}


@dataclass
class Run:
    """Everything one alignment run trains with (``setup``)."""

    cfg: dict[str, Any]
    accelerator: Accelerator
    out: Path
    languages: list[LanguageData]
    model: Any
    reference: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ot_loss: otfast.SinkhornLoss
    total: int

    def say(self, message: str) -> None:
        """Print on the main process."""
        self.accelerator.print(message)


def setup(cfg: dict[str, Any], accelerator: Accelerator, out: Path, base_dir: Path, total: int) -> Run:
    """Data, model (the tiny one is built on the first run), reference copy, optimiser, scheduler, loss.

    The data are checked with the model's own tokenizer: a pair that it leaves without a token on a side
    (within ``model.max_length``) is dropped before batching, and one it cuts to fit is kept; both are counted
    in ``data_report.json``. The tiny model's tokenizer is trained on the training pairs before that check.

    Raises:
        ValueError: bad data, or a ``model.max_length`` above what the model takes (``position_limit``).
    """
    t, main = cfg["train"], accelerator.is_main_process
    raw = load_raw(cfg, base_dir)
    model_path = cfg["model"]["name_or_path"]
    if model_path is None:
        model_path = out / "init_model"
        if main and not (model_path / "config.json").is_file():
            texts = [s for lang in prepare_data(cfg, raw) for pair in lang.train for s in pair]
            build_tiny_model(texts, model_path, seed=cfg["seed"], **cfg["model"]["tiny"])
        accelerator.wait_for_everyone()
    with accelerator.main_process_first():
        model, tokenizer = load_encoder(model_path)
        reference, _ = load_encoder(model_path)
    limit = position_limit(model, tokenizer)
    if limit is not None and cfg["model"]["max_length"] > limit:
        raise ValueError(f"model.max_length {cfg['model']['max_length']} is more than the model ({model_path}) takes: "
                         f"{limit} tokens; set --model.max_length {limit} or less")
    languages = prepare_data(cfg, raw, token_check(tokenizer, cfg["model"]["max_length"]))
    for lang in languages:
        accelerator.print(lang.report.summary())
    if main:
        (out / "data_report.json").write_text(json.dumps([vars(lang.report) for lang in languages], indent=1))
    reference.train(t["dropout"]).requires_grad_(False).to(accelerator.device)
    model.train(t["dropout"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["adam_betas"]), eps=t["adam_eps"],
                                  weight_decay=t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(int(t["warmup_ratio"] * total), total))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_cfg = {k: v for k, v in cfg["loss"].items() if k not in ("granularity", "reg_lambda")}
    return Run(cfg, accelerator, out, languages, model, reference, tokenizer, optimizer, scheduler,
               otfast.SinkhornLoss(**loss_cfg), total)


def start_or_resume(run: Run) -> dict[str, Any]:
    """The trainer state: restored from the newest usable checkpoint, or fresh (with retrieval before)."""
    acc = run.accelerator
    if run.cfg["train"]["resume"]:
        state = resume(run.out, acc, run.model, run.optimizer, run.scheduler, run.cfg)
        if state is not None:
            run.say(f"resumed from {run.out / 'checkpoints' / ('step-' + str(state['step']))} at step {state['step']}")
            return state
    state = {"step": 0, "num_processes": acc.num_processes, "retrieval_before": None, "elapsed": 0.0}
    if acc.is_main_process:
        state["retrieval_before"] = retrieval(acc.unwrap_model(run.model), run.tokenizer, run.languages, run.cfg)
        run.say(f"retrieval before alignment: {state['retrieval_before']['mean']:.3f}")
    return state


def optimizer_step(run: Run, step: int) -> tuple[dict[str, float], float, float]:
    """One optimiser step (``grad_accum`` micro-batches); returns the mean loss parts, the gradient norm and the
    learning rate the step used (the scheduler has moved on to the next step's when it returns)."""
    t, acc = run.cfg["train"], run.accelerator
    sums: dict[str, float] = {}
    for micro in range(t["grad_accum"]):
        idx = [batch_indices(len(lang.train), micro_step=step * t["grad_accum"] + micro, batch_size=t["batch_size"],
                             num_processes=acc.num_processes, process_index=acc.process_index,
                             seed=run.cfg["seed"]) for lang in run.languages]
        sync = micro == t["grad_accum"] - 1
        with acc.no_sync(run.model) if not sync else contextlib.nullcontext():
            loss, parts = alignment_loss(run.model, run.reference, run.tokenizer, run.languages, idx, run.cfg,
                                         run.ot_loss, acc.device, acc.autocast)
            acc.backward(loss / t["grad_accum"])
        for key, value in {"loss": loss.item(), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value / t["grad_accum"]
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), t["max_grad_norm"])
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, float(grad_norm), lr


def train_steps(run: Run, state: dict[str, Any], stop_at: int, log: MetricsLog, signals: StopSignals) -> None:
    """Train from ``state["step"]`` to ``stop_at``, logging and checkpointing; ``state`` is updated in place.

    Raises:
        Interrupted: after the checkpoint that a SIGINT / SIGTERM asked for.
    """
    from tqdm.auto import tqdm

    t, acc = run.cfg["train"], run.accelerator
    bar = tqdm(total=run.total, initial=state["step"], disable=not acc.is_main_process, desc="align",
               dynamic_ncols=True)
    run_started = time.perf_counter() - state["elapsed"]
    try:
        while state["step"] < stop_at:
            sums, grad_norm, lr = optimizer_step(run, state["step"])
            state["step"] += 1
            bar.update(1)
            if state["step"] % t["log_every"] == 0 or state["step"] == run.total:
                values = acc.reduce(torch.tensor(list(sums.values()), device=acc.device), "mean")
                row = dict(zip(sums, values.tolist()))
                row.update(lr=lr, grad_norm=grad_norm,
                           elapsed=time.perf_counter() - run_started)
                log.log(state["step"], row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", reg=f"{row['reg']:.3f}")
            state["elapsed"] = time.perf_counter() - run_started
            signum = signals.requested()
            if (t["checkpoint_every"] and state["step"] % t["checkpoint_every"] == 0) or state["step"] == stop_at \
                    or signum:
                save_checkpoint(run.out, acc, run.model, run.optimizer, run.scheduler, state, t["keep_checkpoints"],
                                run.cfg)
            if signum:
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {state['step']} of "
                                          f"{run.total}; checkpoint {run.out / 'checkpoints'}/step-{state['step']}; "
                                          "run the same command again to resume" if acc.is_main_process else "")
    finally:
        bar.close()


def parameter_digest(model) -> str:
    """SHA-256 over the model's parameters (names and bytes, float32, in order): equal digests mean bitwise
    equal weights."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finish(run: Run, state: dict[str, Any], first_step: int, started: float) -> dict[str, Any] | None:
    """Save ``model/``, measure retrieval after, write ``metrics.json`` (main process; None elsewhere)."""
    acc, out = run.accelerator, run.out
    final = acc.unwrap_model(run.model)
    replica_digests = gather_object([parameter_digest(final)])  # DDP keeps replicas equal: check it
    if not acc.is_main_process:
        return None
    final.save_pretrained(out / "model")
    run.tokenizer.save_pretrained(out / "model")
    after = retrieval(final, run.tokenizer, run.languages, run.cfg)
    before = state["retrieval_before"]
    metrics = {"retrieval_before": before["mean"], "retrieval_after": after["mean"],
               "retrieval_before_by_language": before["by_language"],
               "retrieval_after_by_language": after["by_language"],
               "steps": state["step"], "train_seconds": state["elapsed"],
               "total_seconds": time.perf_counter() - started, "num_processes": acc.num_processes,
               "params_sha256": replica_digests[0], "replica_params_sha256": replica_digests,
               "replicas_identical": len(set(replica_digests)) == 1}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for lang in run.languages:
        if lang.lang in after["by_language"]:
            b, r = before["by_language"][lang.lang], after["by_language"][lang.lang]
            run.say(f"{lang.lang}-{run.cfg['data']['target_lang']} retrieval on {len(lang.held_out)} held-out pairs "
                    f"(mean of both directions): before {b['mean']:.3f} -> after {r['mean']:.3f}")
    now = state["step"] - first_step
    steps = f"{state['step']} steps" + (f", {now} of them in this invocation" if first_step else "")
    run.say(f"retrieval_before {metrics['retrieval_before']:.3f}  retrieval_after {metrics['retrieval_after']:.3f}  "
            f"({steps}, {metrics['total_seconds']:.0f} s); model in {out / 'model'}")
    return metrics


def same_settings(out: Path, cfg: dict[str, Any]) -> None:
    """Before anything is built or written: the newest checkpoint of ``out`` whose ``run_config.json`` reads must
    have the settings of ``cfg`` (``check_settings``; one it cannot read is for ``resume`` to report and skip), and
    without a checkpoint, the run that the folder's ``run_config.json`` says was there: a resume with other
    settings does not start over on its files.

    Raises:
        ValueError: listing the keys that differ.
    """
    found = checkpoint_dirs(out)
    for _, path in reversed(found):
        with contextlib.suppress(CheckpointError):
            check_settings(settings_file(path), cfg)
            return
    if not found and (out / "run_config.json").exists():
        with contextlib.suppress(CheckpointError):
            check_settings(out / "run_config.json", cfg)


def leftovers(out: Path, cfg: dict[str, Any]) -> list[Path]:
    """What an earlier run left in ``out``, which a fresh start removes so that it reuses none of it: ``RUN_FILES``,
    the checkpoints (``step-N`` and unfinished ``.step-N.tmp``: anything else in ``checkpoints/`` stays), and
    ``init_model`` when this run builds its own. Nothing unless a run claimed ``out``: its ``run_config.json`` is
    the first thing it writes, and a folder of other things (``--output-dir .``) may have a ``model/`` of its own.

    Raises:
        ValueError: if ``model.name_or_path`` lies in one of them.
    """
    if not (out / "run_config.json").is_file():
        return []
    model = cfg["model"]["name_or_path"]
    found = [out / name for name in (*RUN_FILES, *(["init_model"] if model is None else [])) if (out / name).exists()]
    found += [path for _, path in checkpoint_dirs(out)] + sorted((out / "checkpoints").glob(".step-*.tmp"))
    if model is not None:
        where = Path(model).resolve()
        for path in found:
            if path.resolve() in (where, *where.parents):
                raise ValueError(f"model.name_or_path {model} is in {path}, which starting over in {out} removes: "
                                 "copy the model elsewhere first, or use a new --output-dir")
    return found


def completed(out: Path, total: int) -> dict[str, Any] | None:
    """The metrics of a run in ``out`` that already finished all ``total`` steps, or None."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("steps") == total else None


def train(cfg: dict[str, Any], base_dir: Path = Path(".")) -> dict[str, Any] | None:
    """Run (or resume) one alignment fine-tuning.

    Args:
        cfg: the configuration from ``train.config.load_config``.
        base_dir: folder that relative data paths are resolved against.

    Returns:
        The final metrics (also written to ``metrics.json``) on the main process; None on the other
        processes and when the run stops early (``train.stop_after_steps``). A run that is already
        complete trains nothing and returns its metrics.

    Raises:
        Interrupted: SIGINT / SIGTERM stopped training (after a checkpoint).
        ValueError: bad data or configuration, no usable checkpoint to resume from, or checkpoints written with
            other settings (``check_settings``).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    t = cfg["train"]
    if t["num_threads"] is not None:
        torch.set_num_threads(t["num_threads"])
    accelerator = Accelerator(mixed_precision=t["mixed_precision"], cpu=t["cpu"],
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if OPENMP_SPINS and torch.get_num_threads() > 1:
        accelerator.print(f"note: torch was imported before train, with no OMP_WAIT_POLICY: its "
                          f"{torch.get_num_threads()} threads spin while they wait, which on a busy machine makes "
                          "steps several times slower; set OMP_WAIT_POLICY=PASSIVE before Python starts (python -m "
                          "train.align does), or --train.num_threads 1", file=sys.stderr)
    out = Path(cfg["output_dir"])
    total = total_steps(cfg, accelerator.num_processes)
    if t["resume"]:
        same_settings(out, cfg)
        done = completed(out, total)
        if done is not None:
            accelerator.print(f"{out} is already complete ({total} steps; retrieval {done['retrieval_before']:.3f} "
                              f"-> {done['retrieval_after']:.3f}); model in {out / 'model'}. Nothing to do: use a new "
                              "--output-dir or --train.resume false to train again")
            return done if accelerator.is_main_process else None
        if (out / "model").exists() and not checkpoint_dirs(out) and (out / "run_config.json").is_file():
            raise ValueError(f"{out} holds a finished run of another length, without checkpoints: use --train.resume "
                             "false to replace it, or a new --output-dir")
    fresh = not t["resume"] or not checkpoint_dirs(out)
    stale = leftovers(out, cfg) if fresh else []
    accelerator.wait_for_everyone()                           # every process has looked before anything goes
    if accelerator.is_main_process:
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if stale:
            accelerator.print(f"starting over in {out}: removed the earlier run's "
                              f"{', '.join(str(p.relative_to(out)) for p in stale)}")
        out.mkdir(parents=True, exist_ok=True)
        if fresh:  # the folder is this run's before anything is built in it (init_model)
            (out / "run_config.json").write_text(json.dumps(cfg, indent=1))
    accelerator.wait_for_everyone()
    set_seed(cfg["seed"])
    started = time.perf_counter()
    run = setup(cfg, accelerator, out, base_dir, total)
    state = start_or_resume(run)
    if accelerator.is_main_process and not fresh:             # what runs: these settings match the checkpoint's
        (out / "run_config.json").write_text(json.dumps(cfg, indent=1))
    first_step = state["step"]
    stop_at = total if t["stop_after_steps"] is None else min(total, first_step + t["stop_after_steps"])
    log = MetricsLog(out, accelerator.is_main_process, first_step)
    try:
        with StopSignals(accelerator) as signals:
            train_steps(run, state, stop_at, log, signals)
    finally:
        log.close()
    if state["step"] < total:
        run.say(f"stopped at step {state['step']} of {total}; run the same command again to resume")
        return None
    return finish(run, state, first_step, started)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status.

    Bad input (config, data, model path, checkpoints) is one ``error:`` line and status 2; an interrupt is
    one line and 128 + the signal.
    """
    args, overrides = parse_args(argv)
    try:
        train(load_config(args.config, overrides, output_dir=args.output_dir))
    except Interrupted as exc:
        if str(exc):
            print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (SIGINT) outside a training step; the checkpoints on disk are kept: run the same "
              "command again to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError) as exc:                 # bad input; a bug (TypeError, ...) keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
