"""Parallel data for alignment: loading, cleaning, word tokenisation, sampling and batching.

Every source yields rows ``{"source": str, "target": str}`` (non-English, English) as a
``datasets.Dataset``:

- ``format: hub``: ``datasets.load_dataset(path, name, split=...)`` (Europarl, MultiUN, OPUS-100, ...);
  ``source_field`` / ``target_field`` are dotted paths into a row (default ``translation.<lang>`` and
  ``translation.<target_lang>``, the OPUS schema).
- ``format: tsv``: one pair per line, ``source<TAB>target``.
- ``format: jsonl``: one JSON object per line; fields as for ``hub`` (default ``source`` / ``target``;
  ``translation.de`` style paths work too).
- ``format: moses``: two line-aligned plain-text files (``source_path``, ``target_path``).
- ``format: synthetic``: ``train.synthetic.synthetic_pairs``.

Malformed rows (a wrong field count, invalid JSON, a missing or non-string field, an empty side, a line
without its partner in a Moses pair) are counted per reason, with the first few locations, in a
``DataReport``; so are pairs removed by the length filter. Nothing is dropped silently, nothing crashes.

``prepare_language`` then shuffles (seeded), holds out evaluation pairs, Moses-tokenises both sides
(sacremoses), filters by length in words, and draws exactly ``pairs_per_language`` training pairs
(upsampling by repetition where fewer exist). ``batch_indices`` gives the deterministic batch of any
process at any step, which is what makes a resume exact.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from sacremoses import MosesTokenizer

FORMATS = ("hub", "tsv", "jsonl", "moses", "synthetic")
MAX_EXAMPLES = 5  # malformed locations kept per reason


@dataclass
class DataReport:
    """Counts of what happened to one language pair's rows.

    Attributes:
        lang: the source language code.
        read: rows (lines) read.
        malformed: ``{reason: count}`` of rows that could not be used as they are.
        examples: ``{reason: [location, ...]}``, the first few locations (``file:line`` or row index).
        filtered: pairs removed by the length filter.
        held_out: pairs kept aside for evaluation.
        unique_train: distinct training pairs before upsampling.
        train: training pairs after upsampling / subsampling.
    """

    lang: str
    read: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    filtered: int = 0
    held_out: int = 0
    unique_train: int = 0
    train: int = 0

    def add_malformed(self, reason: str, where: str) -> None:
        """Count one malformed row and remember where it was (the first few per reason)."""
        self.malformed[reason] = self.malformed.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(where)

    @property
    def n_malformed(self) -> int:
        """Total malformed rows."""
        return sum(self.malformed.values())

    def summary(self) -> str:
        """One line for the log, e.g. ``de: read 1000, malformed 3 (empty target: 2, ...), ...``."""
        bad = ", ".join(f"{r}: {n} at {', '.join(self.examples[r])}" for r, n in sorted(self.malformed.items()))
        return (f"{self.lang}: read {self.read}, malformed {self.n_malformed}" + (f" ({bad})" if bad else "")
                + f", length-filtered {self.filtered}, held out {self.held_out}, unique train {self.unique_train}"
                f", train {self.train}")


def _field(row: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            raise KeyError(path)
        row = row[key]
    return row


def _clean_pair(source: Any, target: Any, report: DataReport, where: str, out: dict[str, list[str]]) -> None:
    if not isinstance(source, str) or not isinstance(target, str):
        report.add_malformed("non-string field", where)
    elif not source.strip():
        report.add_malformed("empty source", where)
    elif not target.strip():
        report.add_malformed("empty target", where)
    else:
        out["source"].append(source.strip())
        out["target"].append(target.strip())


def _rows_from_records(records: Iterable[tuple[str, Any]], source_field: str, target_field: str,
                       report: DataReport) -> datasets.Dataset:
    out: dict[str, list[str]] = {"source": [], "target": []}
    for where, row in records:
        report.read += 1
        try:
            source, target = _field(row, source_field), _field(row, target_field)
        except KeyError as exc:
            report.add_malformed(f"missing field {exc.args[0]}", where)
            continue
        _clean_pair(source, target, report, where, out)
    return datasets.Dataset.from_dict(out)


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
        for line in fh:
            yield line.rstrip("\n").rstrip("\r")


def _read_tsv(path: Path, report: DataReport) -> datasets.Dataset:
    out: dict[str, list[str]] = {"source": [], "target": []}
    for i, line in enumerate(_lines(path), 1):
        report.read += 1
        parts = line.split("\t")
        if len(parts) != 2:
            report.add_malformed("not two tab-separated fields", f"{path.name}:{i}")
            continue
        _clean_pair(parts[0], parts[1], report, f"{path.name}:{i}", out)
    return datasets.Dataset.from_dict(out)


def _jsonl_records(path: Path, report: DataReport) -> Iterator[tuple[str, Any]]:
    for i, line in enumerate(_lines(path), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.read += 1
            report.add_malformed("invalid JSON", f"{path.name}:{i}")
            continue
        yield f"{path.name}:{i}", row


def _read_moses(source_path: Path, target_path: Path, report: DataReport) -> datasets.Dataset:
    out: dict[str, list[str]] = {"source": [], "target": []}
    src_lines, tgt_lines = _lines(source_path), _lines(target_path)
    i = 0
    while True:
        source, target = next(src_lines, None), next(tgt_lines, None)
        if source is None and target is None:
            break
        i += 1
        report.read += 1
        if source is None or target is None:
            longer = target_path if source is None else source_path
            report.add_malformed("unpaired line (files differ in length)", f"{longer.name}:{i}")
            continue
        _clean_pair(source, target, report, f"{source_path.name}/{target_path.name}:{i}", out)
    return datasets.Dataset.from_dict(out)


def load_pairs(spec: dict[str, Any], target_lang: str = "en", base_dir: str | Path = ".") -> tuple[
        datasets.Dataset, DataReport]:
    """Load one language pair's raw parallel rows.

    Args:
        spec: ``{"lang": "de", "format": "hub" | "tsv" | "jsonl" | "moses" | "synthetic", ...}`` with
            ``path`` (hub name or file), ``name`` / ``split`` / ``load_kwargs`` (hub), ``source_field`` /
            ``target_field`` (hub, jsonl), ``source_path`` / ``target_path`` (moses), ``n_pairs`` /
            ``seed`` / ``map_seed`` (synthetic).
        target_lang: the English side's code, for the default hub field ``translation.<target_lang>``.
        base_dir: folder that relative file paths are resolved against.

    Returns:
        ``(dataset, report)``: rows ``{"source", "target"}`` (stripped, non-empty) and the counts.

    Raises:
        ValueError: on an unknown format or a spec missing a required key; FileNotFoundError for a
            missing file.
    """
    lang = spec.get("lang")
    fmt = spec.get("format")
    if not isinstance(lang, str) or not lang:
        raise ValueError(f"data.languages entry needs a 'lang' code, got {spec!r}")
    if fmt not in FORMATS:
        raise ValueError(f"data.languages[{lang}].format must be one of {FORMATS}, got {fmt!r}")
    report = DataReport(lang)

    def need(key: str) -> Any:
        if key not in spec:
            raise ValueError(f"data.languages[{lang}] (format {fmt}) needs '{key}'")
        return spec[key]

    def file(key: str) -> Path:
        path = Path(base_dir) / str(need(key))
        if not path.is_file():
            raise FileNotFoundError(f"data.languages[{lang}].{key}: no such file {path}")
        return path

    if fmt == "synthetic":
        from .synthetic import synthetic_pairs

        ds = synthetic_pairs(int(need("n_pairs")), seed=int(spec.get("seed", 0)),
                             map_seed=int(spec.get("map_seed", 1234)))
        report.read = len(ds)
        return ds, report
    if fmt == "tsv":
        return _read_tsv(file("path"), report), report
    if fmt == "moses":
        return _read_moses(file("source_path"), file("target_path"), report), report
    if fmt == "jsonl":
        path = file("path")
        records = _jsonl_records(path, report)
        return _rows_from_records(records, spec.get("source_field", "source"), spec.get("target_field", "target"),
                                  report), report
    hub = datasets.load_dataset(need("path"), spec.get("name"), split=spec.get("split", "train"),
                                **spec.get("load_kwargs", {}))
    records = ((f"row {i}", row) for i, row in enumerate(hub))
    return _rows_from_records(records, spec.get("source_field", f"translation.{lang}"),
                              spec.get("target_field", f"translation.{target_lang}"), report), report


@dataclass
class LanguageData:
    """One language pair, ready to train on.

    Attributes:
        lang: source language code.
        train: ``pairs_per_language`` training pairs ``(source_words, target_words)``, each side a
            space-joined string of Moses tokens.
        held_out: evaluation pairs of raw sentences ``(source, target)``, never trained on.
        report: the ``DataReport``.
    """

    lang: str
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    report: DataReport


def prepare_language(dataset: datasets.Dataset, report: DataReport, *, pairs_per_language: int,
                     eval_pairs: int = 0, min_words: int = 1, max_words: int = 128, target_lang: str = "en",
                     seed: int = 0, chunk_size: int = 20000, num_proc: int | None = None) -> LanguageData:
    """Shuffle, hold out, word-tokenise, length-filter and sample one language pair.

    The shuffled corpus is read in chunks and tokenised (``datasets.map``) only until enough pairs are
    kept, so a corpus far larger than ``pairs_per_language`` is not tokenised in full.

    Args:
        dataset: rows ``{"source", "target"}`` from ``load_pairs``.
        report: its ``DataReport`` (updated in place).
        pairs_per_language: training pairs to return; fewer unique pairs are upsampled by repeating
            the shuffled list.
        eval_pairs: pairs held out for evaluation (taken first from the shuffled corpus, unfiltered).
        min_words, max_words: keep a pair only if both sides have this many Moses tokens.
        target_lang: Moses tokenizer language of the target side.
        seed: shuffling seed (the same seed gives the same data on every process).
        chunk_size: most rows tokenised per ``datasets.map`` call.
        num_proc: processes for ``datasets.map`` (None = in process).

    Returns:
        ``LanguageData``.

    Raises:
        ValueError: if no training pair is left after cleaning and filtering.
    """
    if pairs_per_language < 1:
        raise ValueError(f"pairs_per_language must be >= 1, got {pairs_per_language}")
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_pairs, max(len(order) - 1, 0))
    held = dataset.select(order[:n_eval])
    held_out = list(zip(held["source"], held["target"]))
    report.held_out = n_eval
    src_tok, tgt_tok = MosesTokenizer(lang=report.lang), MosesTokenizer(lang=target_lang)

    def tokenise(batch: dict[str, list[str]]) -> dict[str, list[str]]:
        return {"source": [" ".join(src_tok.tokenize(s, escape=False)) for s in batch["source"]],
                "target": [" ".join(tgt_tok.tokenize(t, escape=False)) for t in batch["target"]]}

    kept: list[tuple[str, str]] = []
    start = n_eval
    while start < len(order) and len(kept) < pairs_per_language:
        size = min(chunk_size, max(1000, 2 * (pairs_per_language - len(kept))))
        chunk = dataset.select(order[start:start + size]).map(tokenise, batched=True, num_proc=num_proc)
        start += size
        for source, target in zip(chunk["source"], chunk["target"]):
            n_src, n_tgt = len(source.split()), len(target.split())
            if min_words <= n_src <= max_words and min_words <= n_tgt <= max_words:
                kept.append((source, target))
            else:
                report.filtered += 1
    kept = kept[:pairs_per_language]
    if not kept:
        raise ValueError(f"{report.lang}: no training pair left ({report.summary()})")
    report.unique_train = len(kept)
    repeats = math.ceil(pairs_per_language / len(kept))
    train = (kept * repeats)[:pairs_per_language]
    report.train = len(train)
    return LanguageData(report.lang, train, held_out, report)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order in which an epoch visits ``n`` training pairs (a seeded permutation, cached)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(n: int, *, micro_step: int, batch_size: int, num_processes: int, process_index: int,
                  seed: int) -> list[int]:
    """Indices of the pairs one process trains on at one micro-step.

    Micro-step k of an epoch covers the global batch ``order[k G : (k + 1) G]`` with
    ``G = batch_size * num_processes``; process r takes its r-th slice of ``batch_size``. An epoch has
    ``n // G`` micro-steps (the incomplete tail is left for the next epoch's reshuffle); epochs
    follow each other with fresh permutations, so any micro-step can be recomputed from its number
    alone, which is how a resume skips exactly the data already seen.

    Args:
        n: training pairs of the language (``pairs_per_language``).
        micro_step: global micro-step counter (0-based, across epochs).
        batch_size: pairs per process and micro-step.
        num_processes: data-parallel processes.
        process_index: this process.
        seed: the shuffling seed.

    Returns:
        ``batch_size`` indices into the language's ``train`` list.

    Raises:
        ValueError: if one global batch needs more pairs than ``n``.
    """
    global_batch = batch_size * num_processes
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"a global batch of {global_batch} pairs (batch_size {batch_size} x {num_processes} "
                         f"processes) needs at least that many pairs per language, got {n}")
    epoch, k = divmod(micro_step, per_epoch)
    start = k * global_batch + process_index * batch_size
    return list(epoch_order(n, seed, epoch)[start:start + batch_size])
