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
- ``format: gettext``: the compiled gettext catalogues (``.mo``) of a folder, by default
  ``/usr/share/locale/<lang>/LC_MESSAGES`` (``train.catalogues``): each message's translation and its
  English original; placeholders removed, lines joined, and empty, untranslated and repeated messages
  counted, as that module says.
- ``format: synthetic``: ``train.synthetic.synthetic_pairs``.

Malformed rows (a line that is not valid UTF-8, a wrong field count, invalid JSON of any kind, nesting too
deep for the parser included, a missing or non-string field, text that is not valid Unicode, an empty side,
a line without its partner in a Moses pair) are counted per reason, with the first few locations, in a
``DataReport``; every reader catches every per-line failure. Rows kept after an edit (a catalogue message without its
placeholders) are counted too. Each row keeps its location (``where``).

``prepare_language`` then shuffles (seeded), holds out evaluation pairs, Moses-tokenises both sides
(sacremoses), filters by length in words, drops the pairs that the model's tokenizer reduces to no
token on either side (``check``: text the tokenizer strips, such as U+FFFD or zero-width spaces, or a
first word longer than ``max_length`` sub-words), counting them per reason with their locations, counts
the pairs it keeps but cuts to ``max_length`` tokens (as edited), and
draws exactly ``pairs_per_language`` training pairs (upsampling by repetition where fewer exist).
Nothing is dropped silently, nothing crashes. ``batch_indices`` gives the deterministic batch of any
process at any step, which is what makes a resume exact.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from sacremoses import MosesTokenizer

from .hub import load_dataset
from .text import text_lines

FORMATS = ("hub", "tsv", "jsonl", "moses", "gettext", "synthetic")
MAX_EXAMPLES = 5  # malformed locations kept per reason
# The keys a data.languages entry of each format may hold besides lang and format (any other is an error).
SPEC_KEYS = {"hub": ("path", "name", "split", "load_kwargs", "source_field", "target_field"), "tsv": ("path",),
             "jsonl": ("path", "source_field", "target_field"), "moses": ("source_path", "target_path"),
             "gettext": ("path",), "synthetic": ("n_pairs", "seed", "map_seed")}
NOT_UTF8 = "not valid UTF-8"


@dataclass
class DataReport:
    """Counts of what happened to one language pair's rows.

    Attributes:
        lang: the source language code.
        read: rows (lines) read.
        malformed: ``{reason: count}`` of rows that could not be used as they are (reading).
        edited: ``{reason: count}`` of rows kept after a change (reading, ``format: gettext``: a message cleaned;
            preparation: a side cut to ``model.max_length`` tokens, the words after the cut not trained on).
        dropped: ``{reason: count}`` of pairs the tokenizer leaves without a token on a side (preparation).
        examples: ``{reason: [location, ...]}``, the first few locations (``file:line``, ``file.mo#entry`` or
            row index) of every reason of ``malformed``, ``edited`` and ``dropped``.
        filtered: pairs removed by the length filter.
        held_out: pairs kept aside for evaluation.
        unique_train: distinct training pairs before upsampling.
        train: training pairs after upsampling / subsampling.
    """

    lang: str
    read: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    edited: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    filtered: int = 0
    held_out: int = 0
    unique_train: int = 0
    train: int = 0

    def _count(self, table: dict[str, int], reason: str, where: str) -> None:
        table[reason] = table.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(where)

    def add_malformed(self, reason: str, where: str) -> None:
        """Count one malformed row and remember where it was (the first few per reason)."""
        self._count(self.malformed, reason, where)

    def add_edited(self, reason: str, where: str) -> None:
        """Count one row kept after an edit and remember where it was (the first few per reason)."""
        self._count(self.edited, reason, where)

    @property
    def n_malformed(self) -> int:
        """Total malformed rows."""
        return sum(self.malformed.values())

    def summary(self) -> str:
        """One line for the log, e.g. ``de: read 1000, malformed 3 (empty target: 2 at a.tsv:7, ...), ...``."""
        def detail(table: dict[str, int]) -> str:
            bad = ", ".join(f"{r}: {n} at {', '.join(self.examples[r])}" for r, n in sorted(table.items()))
            return f" ({bad})" if bad else ""

        return (f"{self.lang}: read {self.read}, malformed {self.n_malformed}{detail(self.malformed)}, "
                f"edited {sum(self.edited.values())}{detail(self.edited)}, "
                f"no token {sum(self.dropped.values())}{detail(self.dropped)}, length-filtered {self.filtered}, "
                f"held out {self.held_out}, unique train {self.unique_train}, train {self.train}")


def _field(row: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            raise KeyError(path)
        row = row[key]
    return row


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:                          # a lone surrogate, e.g. from JSON's "\ud800"
        return False
    return True


def _clean_pair(source: Any, target: Any, report: DataReport, where: str, out: dict[str, list[str]]) -> None:
    if not isinstance(source, str) or not isinstance(target, str):
        report.add_malformed("non-string field", where)
    elif not _valid_unicode(source) or not _valid_unicode(target):
        report.add_malformed("invalid Unicode (lone surrogate)", where)
    elif not source.strip():
        report.add_malformed("empty source", where)
    elif not target.strip():
        report.add_malformed("empty target", where)
    else:
        out["source"].append(source.strip())
        out["target"].append(target.strip())
        out["where"].append(where)


def _new_rows() -> dict[str, list[str]]:
    return {"source": [], "target": [], "where": []}


def _rows_from_records(records: Iterable[tuple[str, Any]], source_field: str, target_field: str,
                       report: DataReport) -> datasets.Dataset:
    out = _new_rows()
    for where, row in records:
        report.read += 1
        try:
            source, target = _field(row, source_field), _field(row, target_field)
        except KeyError as exc:
            report.add_malformed(f"missing field {exc.args[0]}", where)
            continue
        _clean_pair(source, target, report, where, out)
    return datasets.Dataset.from_dict(out)


def _read_tsv(path: Path, report: DataReport) -> datasets.Dataset:
    out = _new_rows()
    for i, line in enumerate(text_lines(path), 1):
        report.read += 1
        if line is None:
            report.add_malformed(NOT_UTF8, f"{path.name}:{i}")
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            report.add_malformed("not two tab-separated fields", f"{path.name}:{i}")
            continue
        _clean_pair(parts[0], parts[1], report, f"{path.name}:{i}", out)
    return datasets.Dataset.from_dict(out)


def _jsonl_records(path: Path, report: DataReport) -> Iterator[tuple[str, Any]]:
    for i, line in enumerate(text_lines(path), 1):
        if line is None:
            report.read += 1
            report.add_malformed(NOT_UTF8, f"{path.name}:{i}")
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:    # JSONDecodeError, over-long integers, deep nesting
            report.read += 1
            reason = "JSON nested too deeply" if isinstance(exc, RecursionError) else "invalid JSON"
            report.add_malformed(reason, f"{path.name}:{i}")
            continue
        yield f"{path.name}:{i}", row


def _read_moses(source_path: Path, target_path: Path, report: DataReport) -> datasets.Dataset:
    out = _new_rows()
    src_lines, tgt_lines = text_lines(source_path), text_lines(target_path)
    i, end = 0, object()
    while True:
        source, target = next(src_lines, end), next(tgt_lines, end)
        if source is end and target is end:
            break
        i += 1
        report.read += 1
        if source is end or target is end:
            longer = target_path if source is end else source_path
            report.add_malformed("unpaired line (files differ in length)", f"{longer.name}:{i}")
        elif source is None or target is None:
            report.add_malformed(NOT_UTF8, f"{(source_path if source is None else target_path).name}:{i}")
        else:
            _clean_pair(source, target, report, f"{source_path.name}/{target_path.name}:{i}", out)
    return datasets.Dataset.from_dict(out)


def load_pairs(spec: dict[str, Any], target_lang: str = "en", base_dir: str | Path = ".") -> tuple[
        datasets.Dataset, DataReport]:
    """Load one language pair's raw parallel rows.

    Args:
        spec: ``{"lang": "de", "format": "hub" | "tsv" | "jsonl" | "moses" | "gettext" | "synthetic", ...}``
            with ``path`` (hub name, file, or for gettext a ``.mo`` file or folder, default
            ``/usr/share/locale/<lang>/LC_MESSAGES``), ``name`` / ``split`` / ``load_kwargs`` (hub), ``source_field`` /
            ``target_field`` (hub, jsonl), ``source_path`` / ``target_path`` (moses), ``n_pairs`` /
            ``seed`` / ``map_seed`` (synthetic).
        target_lang: the English side's code, for the default hub field ``translation.<target_lang>``.
        base_dir: folder that relative file paths are resolved against.

    Returns:
        ``(dataset, report)``: rows ``{"source", "target", "where"}`` (stripped, non-empty, with their
        location) and the counts.

    Raises:
        ValueError: on an unknown format, a spec missing a required key or holding one its format does not take
            (``SPEC_KEYS``: a typo such as ``mapseed`` is not ignored), or a folder without catalogues;
            FileNotFoundError for a missing file.
    """
    lang = spec.get("lang")
    fmt = spec.get("format")
    if not isinstance(lang, str) or not lang:
        raise ValueError(f"data.languages entry needs a 'lang' code, got {spec!r}")
    if fmt not in FORMATS:
        raise ValueError(f"data.languages[{lang}].format must be one of {FORMATS}, got {fmt!r}")
    allowed = ("lang", "format", *SPEC_KEYS[fmt])
    unknown = [key for key in spec if key not in allowed]
    if unknown:
        raise ValueError(f"data.languages[{lang}]: unknown key {unknown[0]!r} for format {fmt} (allowed: "
                         f"{', '.join(sorted(allowed))})")
    report = DataReport(lang)

    def need(key: str) -> Any:
        if key not in spec:
            raise ValueError(f"data.languages[{lang}] (format {fmt}) needs '{key}'")
        return spec[key]

    def integer(key: str, default: int | None = None) -> int:
        value = need(key) if default is None else spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"data.languages[{lang}].{key} must be an integer, got {value!r}")
        return value

    def file(key: str) -> Path:
        path = Path(base_dir) / str(need(key))
        if not path.is_file():
            raise FileNotFoundError(f"data.languages[{lang}].{key}: no such file {path}")
        return path

    if fmt == "synthetic":
        from .synthetic import synthetic_pairs

        ds = synthetic_pairs(integer("n_pairs"), seed=integer("seed", 0), map_seed=integer("map_seed", 1234))
        report.read = len(ds)
        return ds.add_column("where", [f"row {i}" for i in range(len(ds))]), report
    if fmt == "tsv":
        return _read_tsv(file("path"), report), report
    if fmt == "moses":
        return _read_moses(file("source_path"), file("target_path"), report), report
    if fmt == "gettext":
        from .catalogues import read_catalogues

        out = _new_rows()
        read_catalogues(Path(base_dir) / str(spec.get("path", f"/usr/share/locale/{lang}/LC_MESSAGES")), report, out)
        return datasets.Dataset.from_dict(out), report
    if fmt == "jsonl":
        path = file("path")
        records = _jsonl_records(path, report)
        return _rows_from_records(records, spec.get("source_field", "source"), spec.get("target_field", "target"),
                                  report), report
    hub = load_dataset(need("path"), spec.get("name"), split=spec.get("split", "train"),
                       what=f"data.languages[{lang}]", example=f"{{lang: {lang}, format: tsv, path: FILE}}",
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


# (sources, targets) -> per pair, (why it cannot be trained on, or None; how it is cut to fit, or None), e.g.
# ("source: no sub-word token", None) or (None, "target: cut to max_length 64 tokens").
PairCheck = Callable[[list[str], list[str]], list[tuple[str | None, str | None]]]


def prepare_language(dataset: datasets.Dataset, report: DataReport, *, pairs_per_language: int,
                     eval_pairs: int = 0, min_words: int = 1, max_words: int = 128, target_lang: str = "en",
                     seed: int = 0, chunk_size: int = 20000, num_proc: int | None = None,
                     check: PairCheck | None = None) -> LanguageData:
    """Shuffle, hold out, word-tokenise, length-filter, check and sample one language pair.

    The shuffled corpus is read in chunks and tokenised (``datasets.map``) only until enough pairs are
    kept, so a corpus far larger than ``pairs_per_language`` is not tokenised in full.

    Args:
        dataset: rows ``{"source", "target"}`` (and optionally ``where``) from ``load_pairs``.
        report: its ``DataReport`` (updated in place).
        pairs_per_language: training pairs to return; fewer unique pairs are upsampled by repeating
            the shuffled list.
        eval_pairs: pairs held out for evaluation (taken first from the shuffled corpus, unfiltered).
        min_words, max_words: keep a pair only if both sides have this many Moses tokens.
        target_lang: Moses tokenizer language of the target side.
        seed: shuffling seed (the same seed gives the same data on every process).
        chunk_size: most rows tokenised per ``datasets.map`` call.
        num_proc: processes for ``datasets.map`` (None = in process).
        check: given the Moses-tokenised sources and targets of the pairs that pass the length filter,
            per pair the reason it cannot be trained on and how it is cut to fit the model, each or None
            (``train.modeling.token_check``); the first are counted in ``report.dropped``, the kept pairs
            that are cut in ``report.edited``.

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
    first: dict[str, list[tuple[int, str]]] = {}     # per dropped / cut reason, the first (row, location) in the corpus
    start = n_eval
    while start < len(order) and len(kept) < pairs_per_language:
        size = min(chunk_size, max(1000, 2 * (pairs_per_language - len(kept))))
        rows = order[start:start + size]
        chunk = dataset.select(rows).map(tokenise, batched=True, num_proc=num_proc)
        start += size
        where = chunk["where"] if "where" in chunk.column_names else [f"row {i}" for i in rows]
        fit = []
        for source, target, at, row in zip(chunk["source"], chunk["target"], where, rows):
            n_src, n_tgt = len(source.split()), len(target.split())
            if min_words <= n_src <= max_words and min_words <= n_tgt <= max_words:
                fit.append((source, target, at, row))
            else:
                report.filtered += 1
        verdicts = check([p[0] for p in fit], [p[1] for p in fit]) if check is not None and fit else \
            [(None, None)] * len(fit)
        for (source, target, at, row), (drop, cut) in zip(fit, verdicts):
            if drop is None:
                kept.append((source, target))
            table, reason = (report.dropped, drop) if drop is not None else (report.edited, cut)
            if reason is not None:
                table[reason] = table.get(reason, 0) + 1
                first.setdefault(reason, []).append((row, at))
        first = {reason: sorted(found)[:MAX_EXAMPLES] for reason, found in first.items()}
    report.examples.update({reason: [at for _, at in found] for reason, found in first.items()})
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
