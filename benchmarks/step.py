"""One alignment step of an encoder, with and without the OT term: the share of the step the OT loss costs.

Usage::

    python -m benchmarks.step [--quick] [--out DIR] [--device cpu|cuda] [--update-docs]

The step is the harness's own: ``train.align.alignment_loss`` on a micro-batch of parallel sentences (the
encoder, the frozen initial copy for the English regulariser sum ||h - h0||^2, word vectors from the last
sub-word, the OT term summed over pairs), then backward and an Adam step. The OT term is
``otfast.SinkhornLoss`` with the paper's settings (sqeuclidean, blur 0.05, scaling 0.5, debiased) on each
backend that runs here, or GeomLoss ``SamplesLoss`` (tensorized, the paper's choice); without it the step is
the regulariser alone (the paper's L2 baseline, Cao et al. 2020).

The sentences come from the synthetic language pair (``train.synthetic``), several joined per side so that
they reach ``max_tokens`` / 2 to ``max_tokens`` sub-words; the tokenizer is trained on them as the demo's is.
The encoder is randomly initialised from a ``transformers.BertConfig`` (nothing is downloaded): a tiny BERT on
CPU, an mBERT-sized one (bert-base-multilingual-cased's config) on CUDA. The steps are timed alternately
(so drifting load hits all of them); OT share = (with - without) / with, from the medians, and its noise
band from the 20th and 80th percentiles: a share whose band reaches below 0 is within noise and is flagged
so. The paper's OT term cost about a third of the step (8 h against 6 h per epoch on a V100).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import otfast

from . import results as res
from .providers import import_reason
from .report import add_docs_arguments, base_columns, docs_targets, render_after_run
from .timing import load_average, synchronize

MODELS = {
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-base-multilingual-cased-config": dict(vocab_size=119547, hidden_size=768, num_hidden_layers=12,
                                                num_attention_heads=12, intermediate_size=3072,
                                                max_position_embeddings=512),
}
PAPER_LOSS = dict(cost="sqeuclidean", blur=0.05, scaling=0.5, debias=True, reduction="sum")


def long_pairs(pairs: int, max_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """``pairs`` parallel sentences of the synthetic pair, consecutive sentences joined per side until the
    English side has about ``max_tokens`` / 2 to ``max_tokens`` / 1.5 words (sub-words add the rest)."""
    from train.synthetic import synthetic_pairs

    rng = np.random.default_rng(seed)
    rows = synthetic_pairs(pairs * max_tokens, seed=seed)
    out, k = [], 0
    for _ in range(pairs):
        want = int(rng.integers(max_tokens // 2, max_tokens * 2 // 3 + 1))
        src, tgt = [], []
        while len(tgt) < want:
            src += rows[k]["source"].split()
            tgt += rows[k]["target"].split()
            k += 1
        out.append((" ".join(src), " ".join(tgt[:want + 4])))
    return out


class AlignmentStep:
    """One optimiser step of OT alignment as ``train.align`` takes it, with a given OT term.

    Args:
        model: the encoder to train; tokenizer: its tokenizer.
        pairs: the micro-batch's (source, target) sentences.
        max_tokens: sub-words per sentence at most (``model.max_length``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], max_tokens: int):
        from train.config import load_config
        from train.data import DataReport, LanguageData

        self.cfg = load_config(Path(__file__).resolve().parent.parent / "train" / "configs" / "tiny.yaml",
                               ["--model.max_length", str(max_tokens)])
        self.languages = [LanguageData("xx", pairs, [], DataReport("xx"))]
        self.indices = [list(range(len(pairs)))]
        self.model, self.tokenizer = model.eval(), tokenizer  # the harness trains without dropout
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
        self.device = next(model.parameters()).device

    def __call__(self, ot_loss) -> float:
        """Run the step with the OT term ``ot_loss`` (called as the harness calls ``otfast.SinkhornLoss``).

        Returns:
            The loss.
        """
        from train.align import alignment_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = alignment_loss(self.model, self.reference, self.tokenizer, self.languages, self.indices, self.cfg,
                                 ot_loss, self.device, contextlib.nullcontext)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def no_ot_term(x, y, mask_x, mask_y):
    """The step without the OT term: the regulariser alone (the L2 baseline)."""
    return x.new_zeros(())


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


def ot_terms(device: str, log=print) -> dict[str, callable]:
    """The OT terms the step is timed with, by backend name: none ("-", the regulariser alone), every otfast
    backend that runs on ``device``, and GeomLoss (tensorized) where it imports (else the log says why not)."""
    backends = [b for b, info in otfast.backends().items()
                if info.available and not (b == "triton" and device != "cuda") and not (b == "cpu" and device != "cpu")]
    terms = {"-": no_ot_term, **{f"otfast:{b}": otfast.SinkhornLoss(backend=b, **PAPER_LOSS) for b in backends}}
    reason = import_reason("geomloss")
    if reason is None:
        terms["geomloss:tensorized"] = GeomLossTerm()
    else:
        log(f"  geomloss:tensorized skipped ({reason})")
    return terms


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


def build_step(device: str, pairs: int, max_tokens: int, folder: Path) -> tuple[str, dict, AlignmentStep]:
    """(model name, its config, the step): the tokenizer trained on the sentences as the demo's is, the encoder
    a tiny BERT on CPU or an mBERT-sized one on CUDA."""
    from transformers import BertConfig, BertModel

    from train.modeling import build_tiny_model, load_tokenizer

    sentences = long_pairs(pairs, max_tokens)
    name = "bert-tiny" if device == "cpu" else "bert-base-multilingual-cased-config"
    cfg = dict(MODELS[name])
    build_tiny_model([s for pair in sentences for s in pair], folder, vocab_size=2000,
                     max_position_embeddings=max(128, max_tokens), **(cfg if device == "cpu" else {}))
    tokenizer = load_tokenizer(folder)
    cfg.setdefault("vocab_size", tokenizer.vocab_size)
    cfg.setdefault("max_position_embeddings", max(128, max_tokens))
    torch.manual_seed(0)
    model = BertModel(BertConfig(**cfg)).to(device)
    return name, cfg, AlignmentStep(model, tokenizer, sentences, max_tokens)


def ot_shares(rows: list[dict]) -> None:
    """Fill ``ot_share`` and ``detail`` of the ``step+ot`` rows against the first row (the step without OT):
    (with - without) / with from the medians, and the band that the 20th and 80th percentiles allow; a band
    that reaches below 0 is noise, and the detail says so."""
    base = rows[0]
    for row in rows[1:]:
        row["ot_share"] = (row["p50_ms"] - base["p50_ms"]) / row["p50_ms"]
        low = (row["p20_ms"] - base["p80_ms"]) / row["p20_ms"]
        high = (row["p80_ms"] - base["p20_ms"]) / row["p80_ms"]
        row["detail"] = (f"OT share {100 * row['ot_share']:.1f}%, noise band {100 * low:.1f}% to {100 * high:.1f}%"
                         + (" (within noise)" if low < 0 else ""))


def run(device: str, quick: bool, base: dict, log=print) -> list[dict]:
    """Time the step without the OT term, and with it for every otfast backend that runs on ``device`` and
    for GeomLoss (tensorized, the paper's choice) where it is installed (``ot_terms``).

    Returns:
        CSV rows (``kind="step"``): one ``step`` row (backend "-"), one ``step+ot`` row per OT implementation
        (backend "otfast:<backend>" or "geomloss:tensorized") with its ``ot_share`` and, in ``detail``, its
        noise band (flagged when it reaches below 0).
    """
    pairs, max_tokens = 24, 48 if device == "cpu" else 128
    with tempfile.TemporaryDirectory() as folder:
        name, cfg, step = build_step(device, pairs, max_tokens, Path(folder))
    fns = {b: (lambda loss: lambda: step(loss))(loss) for b, loss in ot_terms(device, log).items()}
    warmup, repeats = (1, 5) if quick else (2, 10)
    times = time_alternately(fns, device, warmup, repeats)
    head = dict(base, kind="step", provider=name, setting="paper", B=pairs, N=max_tokens, M=max_tokens,
                D=cfg["hidden_size"], dtype="fp32", status="ok", repeats=repeats, load_avg=load_average())
    rows = []
    for backend, ts in times.items():
        p20, p50, p80 = (float(np.percentile(ts, q)) * 1e3 for q in (20, 50, 80))
        rows.append(dict(head, backend=backend, mode="step" if backend == "-" else "step+ot",
                         p20_ms=p20, p50_ms=p50, p80_ms=p80))
    ot_shares(rows)
    for row in rows:
        log(f"  {row['mode']:8s} {row['backend']:20s} p50 {row['p50_ms']:.1f} ms  " + row.get("detail", ""))
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
    render_after_run(csv_path, args.device, out, results_md, readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
