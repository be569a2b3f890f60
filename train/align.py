"""OT alignment fine-tuning of a multilingual encoder (Alqahtani et al., Findings of EMNLP 2021).

    python -m train.align --config train/configs/tiny.yaml [--section.key value ...] [--output-dir DIR]
    accelerate launch -m train.align --config train/configs/paper_wordot.yaml      # DDP, many GPUs

Per step and language pair (source, English): the words of both sides go through the encoder, each
word is one vector of the aligned layer (its last sub-word by default), and the loss is

    sum over pairs of  S_eps(source words, English words)          (otfast.SinkhornLoss, debiased)
    + lambda * sum over English tokens ||h(t) - h0(t)||^2 / P    (h0: the frozen initial encoder)

with P the sentence pairs of the micro-batch (all languages) and S_eps one OT problem per sentence
pair (``loss.granularity: sentence``, averaged over the pairs of a language) or one over all the words
of the batch (``batch``). AdamW, linear warm-up and decay, gradient accumulation and clipping,
autocast, ``accelerate`` for DDP.

Output folder: ``metrics.csv`` and ``tensorboard/`` (training curves), ``data_report.json``,
``run_config.json``, ``checkpoints/step-N/`` (safetensors model, optimiser, scheduler, per-process RNG, data position;
the run resumes from the newest one), ``model/`` (``save_pretrained`` model and tokenizer) and
``metrics.json`` with ``retrieval_before`` / ``retrieval_after`` (held-out pairs, mean of both
directions, averaged over languages) and the per-language details.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from safetensors.torch import load_model, save_model

import otfast

from .config import load_config
from .data import LanguageData, batch_indices, load_pairs, prepare_language
from .modeling import build_tiny_model, encode_words, layer_states, load_encoder, word_embeddings
from .retrieval import evaluate_retrieval


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Split the command line into ``--config`` / ``--output-dir`` and ``--section.key value`` overrides."""
    parser = argparse.ArgumentParser(prog="python -m train.align", description=__doc__.split("\n\n")[0],
                                     epilog="Any other '--section.key value' pair overrides the config, "
                                            "e.g. --train.lr 1e-4 --loss.granularity batch.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. train/configs/tiny.yaml")
    parser.add_argument("--output-dir", default=None, help="output folder (default: the config's output_dir)")
    return parser.parse_known_args(argv)


def build_data(cfg: dict[str, Any], base_dir: Path) -> list[LanguageData]:
    """Load and prepare every language pair of the config (same result on every process)."""
    d = cfg["data"]
    out = []
    for spec in d["languages"]:
        dataset, report = load_pairs(spec, d["target_lang"], base_dir)
        out.append(prepare_language(dataset, report, pairs_per_language=d["pairs_per_language"],
                                    eval_pairs=d["eval_pairs"], min_words=d["min_words"],
                                    max_words=d["max_words"], target_lang=d["target_lang"],
                                    seed=cfg["seed"], num_proc=d["num_proc"]))
    return out


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def alignment_loss(model, reference, tokenizer, languages: list[LanguageData], indices: list[list[int]],
                   cfg: dict[str, Any], ot_loss: otfast.SinkhornLoss, device: torch.device, autocast
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch: OT per language pair plus the English-side regulariser.

    Args:
        model: the encoder being trained (possibly DDP-wrapped).
        reference: the frozen initial encoder (h0).
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


def save_checkpoint(folder: Path, accelerator: Accelerator, model, optimizer, scheduler, state: dict[str, Any],
                    keep: int) -> None:
    """Write ``folder/checkpoints/step-N`` (N = ``state["step"]``) and prune all but the newest ``keep``.

    Plain state only: the model as safetensors, optimiser / scheduler / grad-scaler state dicts and
    per-process RNG states with ``torch.save`` (tensors, numbers, lists), the trainer state as JSON.
    The folder is written under a temporary name and renamed, so a crash never leaves half a checkpoint.
    """
    root = folder / "checkpoints"
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name[5:]))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` folder, or None."""
    done = [p for p in (folder / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def load_checkpoint(path: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote (``torch.load(weights_only=True)``); returns the trainer state.

    Raises:
        ValueError: if the checkpoint was written by a different number of processes.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}: the data position would not match")
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), device=str(accelerator.device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    return state


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


class MetricsLog:
    """Training curves to ``metrics.csv`` (appended on resume) and TensorBoard (main process only)."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled, self.folder, self.writer = enabled, folder, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))

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


def train(cfg: dict[str, Any], base_dir: Path = Path(".")) -> dict[str, Any] | None:
    """Run (or resume) one alignment fine-tuning.

    Args:
        cfg: the configuration from ``train.config.load_config``.
        base_dir: folder that relative data paths are resolved against.

    Returns:
        The final metrics (also written to ``metrics.json``) on the main process; None on the other
        processes and when the run stops early (``train.stop_after_steps``).
    """
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    t = cfg["train"]
    if t["num_threads"] is not None:
        torch.set_num_threads(t["num_threads"])
    accelerator = Accelerator(mixed_precision=t["mixed_precision"], cpu=t["cpu"],
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    say = accelerator.print
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg["seed"])
    started = time.perf_counter()

    languages = build_data(cfg, base_dir)
    for lang in languages:
        say(lang.report.summary())
    if main:
        (out / "data_report.json").write_text(json.dumps([vars(lang.report) for lang in languages], indent=1))
        (out / "run_config.json").write_text(json.dumps(cfg, indent=1))

    model_path = cfg["model"]["name_or_path"]
    if model_path is None:
        model_path = out / "init_model"
        if main and not (model_path / "config.json").is_file():
            texts = [s for lang in languages for pair in lang.train for s in pair]
            build_tiny_model(texts, model_path, seed=cfg["seed"], **cfg["model"]["tiny"])
        accelerator.wait_for_everyone()
    with accelerator.main_process_first():
        model, tokenizer = load_encoder(model_path)
        reference, _ = load_encoder(model_path)
    reference.eval().requires_grad_(False).to(accelerator.device)
    model.train()

    per_epoch = cfg["data"]["pairs_per_language"] // (t["batch_size"] * accelerator.num_processes)
    total = t["max_steps"] if t["max_steps"] is not None else t["epochs"] * per_epoch // t["grad_accum"]
    if total < 1 or per_epoch < 1:
        raise ValueError(f"no optimizer step to run: {cfg['data']['pairs_per_language']} pairs per language, "
                         f"batch {t['batch_size']} x {accelerator.num_processes} processes x accumulation "
                         f"{t['grad_accum']}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["adam_betas"]), eps=t["adam_eps"],
                                  weight_decay=t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(int(t["warmup_ratio"] * total), total))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_cfg = {k: v for k, v in cfg["loss"].items() if k not in ("granularity", "reg_lambda")}
    ot_loss = otfast.SinkhornLoss(**loss_cfg)

    state = {"step": 0, "num_processes": accelerator.num_processes, "retrieval_before": None, "elapsed": 0.0}
    ckpt = latest_checkpoint(out) if t["resume"] else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
        say(f"resumed from {ckpt} at step {state['step']}")
    else:
        if main:
            state["retrieval_before"] = retrieval(accelerator.unwrap_model(model), tokenizer, languages, cfg)
            say(f"retrieval before alignment: {state['retrieval_before']['mean']:.3f}")

    log = MetricsLog(out, main)
    bar = tqdm(total=total, initial=state["step"], disable=not main, desc="align", dynamic_ncols=True)
    stop_at = total if t["stop_after_steps"] is None else min(total, state["step"] + t["stop_after_steps"])
    run_started = time.perf_counter() - state["elapsed"]
    while state["step"] < stop_at:
        sums: dict[str, float] = {}
        for micro in range(t["grad_accum"]):
            micro_step = state["step"] * t["grad_accum"] + micro
            idx = [batch_indices(len(lang.train), micro_step=micro_step, batch_size=t["batch_size"],
                                 num_processes=accelerator.num_processes,
                                 process_index=accelerator.process_index, seed=cfg["seed"]) for lang in languages]
            sync = micro == t["grad_accum"] - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                loss, parts = alignment_loss(model, reference, tokenizer, languages, idx, cfg, ot_loss,
                                             accelerator.device, accelerator.autocast)
                accelerator.backward(loss / t["grad_accum"])
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / t["grad_accum"]
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        if state["step"] % t["log_every"] == 0 or state["step"] == total:
            values = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
            row = dict(zip(sums, values.tolist()))
            row.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                       elapsed=time.perf_counter() - run_started)
            log.log(state["step"], row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", reg=f"{row['reg']:.3f}")
        state["elapsed"] = time.perf_counter() - run_started
        if (t["checkpoint_every"] and state["step"] % t["checkpoint_every"] == 0) or state["step"] == stop_at:
            save_checkpoint(out, accelerator, model, optimizer, scheduler, state, t["keep_checkpoints"])
    bar.close()
    log.close()
    if state["step"] < total:
        say(f"stopped at step {state['step']} of {total}; run the same command again to resume")
        return None

    final = accelerator.unwrap_model(model)
    replica_digests = gather_object([parameter_digest(final)])  # DDP keeps replicas equal: check it
    if not main:
        return None
    final.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    after = retrieval(final, tokenizer, languages, cfg)
    before = state["retrieval_before"]
    metrics = {"retrieval_before": before["mean"], "retrieval_after": after["mean"],
               "retrieval_before_by_language": before["by_language"],
               "retrieval_after_by_language": after["by_language"],
               "steps": state["step"], "train_seconds": state["elapsed"],
               "total_seconds": time.perf_counter() - started, "num_processes": accelerator.num_processes,
               "params_sha256": replica_digests[0], "replica_params_sha256": replica_digests,
               "replicas_identical": len(set(replica_digests)) == 1}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for lang in languages:
        if lang.lang in after["by_language"]:
            b, r = before["by_language"][lang.lang], after["by_language"][lang.lang]
            say(f"{lang.lang}-{cfg['data']['target_lang']} retrieval on {len(lang.held_out)} held-out pairs (mean of "
                f"both directions): before {b['mean']:.3f} -> after {r['mean']:.3f}")
    say(f"retrieval_before {metrics['retrieval_before']:.3f}  retrieval_after {metrics['retrieval_after']:.3f}  "
        f"({state['step']} steps, {metrics['total_seconds']:.0f} s); model in {out / 'model'}")
    return metrics


def parameter_digest(model) -> str:
    """SHA-256 over the model's parameters (names and bytes, float32, in order): equal digests mean bitwise
    equal weights."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides, output_dir=args.output_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
