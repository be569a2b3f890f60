"""One alignment step of an encoder, with and without the OT term: the share of the step the OT loss costs.

Usage::

    python -m benchmarks.step [--quick] [--out DIR] [--device cpu|cuda] [--update-docs]

The step is the harness's (``train/align.py``): a batch of parallel sentences (targets and sources) goes
through the encoder (``train.modeling.layer_states``), the frozen initial encoder gives h0 for the English
regulariser sum ||h - h0||^2, word representations come from the last sub-word (``word_embeddings``, the
paper's WordOT), and the OT term is ``otfast.SinkhornLoss`` with the paper's settings (sqeuclidean, blur
0.05, scaling 0.5, debiased), summed over pairs; then backward and an Adam step. Without the OT term the
step is the regulariser alone (the paper's L2 baseline, Cao et al. 2020).

The encoder is randomly initialised from a ``transformers.BertConfig`` (nothing is downloaded): a tiny BERT
on CPU, an mBERT-sized one (bert-base-multilingual-cased's config) on CUDA. Token ids are random, sentence
lengths random in [max_tokens / 2, max_tokens], words of one or two sub-words. The two steps are timed
alternately (so drifting load hits both); OT share = (with - without) / with, from the medians. The paper's
OT term cost about a third of the step (8 h against 6 h per epoch on a V100).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import otfast

from . import results as res
from .report import add_docs_arguments, base_columns, docs_targets, render
from .timing import load_average, synchronize

MODELS = {
    "bert-tiny": dict(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=128),
    "bert-base-multilingual-cased-config": dict(vocab_size=119547, hidden_size=768, num_hidden_layers=12,
                                                num_attention_heads=12, intermediate_size=3072,
                                                max_position_embeddings=512),
}
PAPER_LOSS = dict(cost="sqeuclidean", blur=0.05, scaling=0.5, debias=True, reduction="sum")


def make_batch(pairs: int, max_tokens: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Targets then sources, ``[2 pairs, max_tokens]``: input ids, attention mask and word ids.

    Each sentence is [CLS] tokens [SEP] padding; ``word_ids`` is -1 on special tokens and padding, and groups
    the other tokens into words of one or two sub-words (as ``train.modeling.encode_words`` returns them).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    lengths = torch.randint(max_tokens // 2, max_tokens + 1, (rows,), generator=gen)
    ids = torch.randint(5, vocab_size, (rows, max_tokens), generator=gen)
    mask = torch.arange(max_tokens).unsqueeze(0) < lengths.unsqueeze(1)
    word_ids = torch.full((rows, max_tokens), -1, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0], ids[r, n - 1] = 2, 3  # [CLS], [SEP]
        starts = torch.rand(n - 2, generator=gen) < 0.7
        starts[0] = True
        word_ids[r, 1:n - 1] = torch.cumsum(starts.long(), 0) - 1
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": mask.long(), "word_ids": word_ids}


class AlignmentStep:
    """One optimiser step of OT alignment (or of the regulariser alone).

    Args:
        model: the encoder to train.
        batch: ``make_batch``'s dict (targets first), on the model's device.
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        from train.modeling import layer_states, word_embeddings

        self.layer_states, self.word_embeddings = layer_states, word_embeddings
        self.model, self.batch = model, batch
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
        self.n_tgt = batch["input_ids"].shape[0] // 2

    def __call__(self, ot_loss: torch.nn.Module | None) -> float:
        """Run the step with the OT term ``ot_loss`` (an ``otfast.SinkhornLoss``), or without it (None).

        Returns:
            The loss.
        """
        self.optimizer.zero_grad(set_to_none=True)
        h = self.layer_states(self.model, self.batch)
        with torch.no_grad():
            h0 = self.layer_states(self.reference, self.batch)[:self.n_tgt]
        english = (self.batch["word_ids"][:self.n_tgt] >= 0).unsqueeze(-1)
        loss = ((h[:self.n_tgt] - h0) ** 2 * english).sum() / self.n_tgt
        if ot_loss is not None:
            x, mask = self.word_embeddings(h, self.batch["word_ids"], "last")
            n = self.n_tgt
            loss = loss + ot_loss(x[n:], x[:n], mask[n:], mask[:n])
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


class GeomLossTerm(torch.nn.Module):
    """The paper's OT term as its authors ran it: GeomLoss ``SamplesLoss`` (tensorized), padding as zero weights."""

    def __init__(self):
        super().__init__()
        from geomloss import SamplesLoss

        self.loss = SamplesLoss("sinkhorn", p=2, blur=PAPER_LOSS["blur"], scaling=PAPER_LOSS["scaling"],
                                debias=True, backend="tensorized")

    def forward(self, x, y, mask_x, mask_y):
        a = mask_x.to(x.dtype) / mask_x.sum(1, keepdim=True)
        b = mask_y.to(y.dtype) / mask_y.sum(1, keepdim=True)
        return self.loss(a, x, b, y).sum()


def time_alternately(fns: dict[str, callable], device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times (s) of each function, called in turn ``repeats`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def run(device: str, quick: bool, base: dict, log=print) -> list[dict]:
    """Time the step without the OT term, and with it for every otfast backend that runs on ``device`` and
    for GeomLoss (tensorized, the paper's choice).

    Returns:
        CSV rows (``kind="step"``): one ``step`` row (backend "-"), one ``step+ot`` row per OT implementation
        (backend "otfast:<backend>" or "geomloss:tensorized") with its ``ot_share``.
    """
    from transformers import BertConfig, BertModel

    name = "bert-tiny" if device == "cpu" else "bert-base-multilingual-cased-config"
    cfg = MODELS[name]
    pairs, max_tokens = 24, 48 if device == "cpu" else 128
    torch.manual_seed(0)
    model = BertModel(BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(device)
    model.train()
    batch = {k: v.to(device) for k, v in make_batch(pairs, max_tokens, cfg["vocab_size"]).items()}
    backends = [b for b, info in otfast.backends().items()
                if info.available and not (b == "triton" and device != "cuda") and not (b == "cpu" and device != "cpu")]
    step = AlignmentStep(model, batch)
    losses = {"-": None, **{f"otfast:{b}": otfast.SinkhornLoss(backend=b, **PAPER_LOSS) for b in backends},
              "geomloss:tensorized": GeomLossTerm()}
    fns = {b: (lambda loss: lambda: step(loss))(loss) for b, loss in losses.items()}
    warmup, repeats = (1, 3) if quick else (2, 10)
    times = time_alternately(fns, device, warmup, repeats)
    head = dict(base, kind="step", provider=name, setting="paper", B=pairs, N=max_tokens, M=max_tokens,
                D=cfg["hidden_size"], dtype="fp32", status="ok", repeats=repeats, load_avg=load_average())
    rows = []
    for backend, ts in times.items():
        p20, p50, p80 = (float(np.percentile(ts, q)) * 1e3 for q in (20, 50, 80))
        rows.append(dict(head, backend=backend, mode="step" if backend == "-" else "step+ot",
                         p20_ms=p20, p50_ms=p50, p80_ms=p80))
    base_p50 = rows[0]["p50_ms"]
    for row in rows:
        if row["mode"] == "step+ot":
            row["ot_share"] = (row["p50_ms"] - base_p50) / row["p50_ms"]
        log(f"  {row['mode']:8s} {row['backend']:20s} p50 {row['p50_ms']:.1f} ms"
            + (f"  OT share {100 * row['ot_share']:.1f}%" if row.get("ot_share") is not None else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--out", type=Path, default=None, help="folder of results.csv (as benchmarks.report)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--note", default="", help="free text stored with the rows")
    add_docs_arguments(ap)
    args = ap.parse_args(argv)
    out, results_md, readme = docs_targets(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    command = "python -m benchmarks.step " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = run(args.device, args.quick, base_columns(args.device, command.strip(), args.note))
    csv_path = out / "results.csv"
    res.append_rows(csv_path, rows)
    print(f"appended to {csv_path}")
    render(res.read_rows(csv_path), [args.device], out, results_md, readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
