"""Word-alignment files (Pharaoh format, parallel text) and alignment error rate.

Pharaoh format: one line per sentence pair, space-separated 0-based links ``i-j`` (source word i, target
word j); gold files mark possible links ``ipj``. Sure links are also possible (S is a subset of P).
Scores (Och & Ney 2003), with counts summed over the corpus, A the predicted links:

    precision = |A & P| / |A|,   recall = |A & S| / |S|,   AER = 1 - (|A & S| + |A & P|) / (|A| + |S|).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..text import text_lines

Link = tuple[int, int]
_LINK = re.compile(r"^(\d+)([-p])(\d+)$")


def parse_links(line: str, *, allow_possible: bool = True, where: str = "line") -> tuple[set[Link], set[Link]]:
    """Parse one Pharaoh line.

    Args:
        line: e.g. ``"0-0 1p2 2-1"``.
        allow_possible: accept ``ipj`` links (gold files); predictions hold only ``i-j``.
        where: named in error messages (e.g. ``"gold.txt:3"``).

    Returns:
        ``(sure, possible)`` sets of ``(i, j)``; possible includes every sure link.
    """
    sure: set[Link] = set()
    possible: set[Link] = set()
    for token in line.split():
        m = _LINK.match(token)
        if m is None:
            raise ValueError(f"{where}: {token!r} is not a link 'i-j' or 'ipj'")
        link = (int(m.group(1)), int(m.group(3)))
        if m.group(2) == "p":
            if not allow_possible:
                raise ValueError(f"{where}: possible link {token!r} in predictions (only 'i-j' links)")
        else:
            sure.add(link)
        possible.add(link)
    return sure, possible


def read_pharaoh(path: str | Path, *, allow_possible: bool = True) -> list[tuple[set[Link], set[Link]]]:
    """``(sure, possible)`` per line of a Pharaoh file (an empty line is a pair without links), read as the parallel
    text is (``_lines``)."""
    return [parse_links(line, allow_possible=allow_possible, where=f"{path}:{n}")
            for n, line in enumerate(_lines(path), 1)]


def format_links(links: Iterable[Link]) -> str:
    """``"i-j i-j ..."`` sorted by (i, j)."""
    return " ".join(f"{i}-{j}" for i, j in sorted(links))


def write_pharaoh(path: str | Path, alignments: Iterable[Iterable[Link]]) -> None:
    """Write one Pharaoh line per sentence pair."""
    with open(path, "w", encoding="utf-8") as fh:
        for links in alignments:
            fh.write(format_links(links) + "\n")


def score_alignments(gold: list[tuple[set[Link], set[Link]]], predicted: list[set[Link]]) -> dict[str, float]:
    """Corpus-level precision, recall and AER (fractions in [0, 1]).

    Args:
        gold: ``(sure, possible)`` per sentence pair (``read_pharaoh``).
        predicted: the predicted links per sentence pair.

    Returns:
        ``{"precision", "recall", "aer", "n_pairs", "n_predicted", "n_sure", "n_possible"}``; precision is 0
        when nothing is predicted.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} sentence pairs, predictions have {len(predicted)}")
    n_a = n_s = n_p = a_s = a_p = 0
    for (sure, possible), links in zip(gold, predicted):
        links = set(links)
        possible = possible | sure
        n_a += len(links)
        n_s += len(sure)
        n_p += len(possible)
        a_s += len(links & sure)
        a_p += len(links & possible)
    if n_s == 0:
        raise ValueError("gold has no sure link: recall and AER are undefined")
    return {"precision": a_p / n_a if n_a else 0.0, "recall": a_s / n_s, "aer": 1.0 - (a_s + a_p) / (n_a + n_s),
            "n_pairs": len(gold), "n_predicted": n_a, "n_sure": n_s, "n_possible": n_p}


def _lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (``train.text.text_lines``: only LF or CR LF ends one, a byte-order mark is
    not text).

    Raises:
        ValueError: naming the first line that is not valid UTF-8.
    """
    lines = list(text_lines(path))
    bad = next((n for n, line in enumerate(lines, 1) if line is None), None)
    if bad is not None:
        raise ValueError(f"{path}:{bad} is not valid UTF-8")
    return lines


def read_parallel(source: str | Path, target: str | Path | None = None) -> list[tuple[list[str], list[str]]]:
    """Word-tokenised parallel sentences, one per line (``_lines``).

    Args:
        source: a plain-text file of whitespace-tokenised sentences, or with ``target=None`` a fast_align
            style file with ``source words ||| target words`` per line.
        target: the target-side file, line-aligned with ``source``.

    Returns:
        ``[(source_words, target_words), ...]``.
    """
    src_lines = _lines(source)
    if target is None:
        pairs = []
        for n, line in enumerate(src_lines, 1):
            if line.count("|||") != 1:
                raise ValueError(f"{source}:{n}: expected 'source ||| target'")
            s, t = line.split("|||")
            pairs.append((s.split(), t.split()))
    else:
        tgt_lines = _lines(target)
        if len(src_lines) != len(tgt_lines):
            raise ValueError(f"{source} has {len(src_lines)} lines, {target} has {len(tgt_lines)}")
        pairs = [(s.split(), t.split()) for s, t in zip(src_lines, tgt_lines)]
    for n, (s, t) in enumerate(pairs, 1):
        if not s or not t:
            raise ValueError(f"{source}:{n}: empty sentence (every pair needs words on both sides)")
    return pairs


def check_links_in_range(alignments: list[tuple[set[Link], set[Link]]],
                         pairs: list[tuple[list[str], list[str]]], what: str) -> None:
    """Raise ``ValueError`` when a link points past the words of its sentence pair."""
    if len(alignments) != len(pairs):
        raise ValueError(f"{what} has {len(alignments)} lines, the parallel text {len(pairs)} pairs")
    for n, ((_, possible), (s, t)) in enumerate(zip(alignments, pairs), 1):
        bad = [(i, j) for i, j in possible if i >= len(s) or j >= len(t)]
        if bad:
            raise ValueError(f"{what}:{n}: link {bad[0][0]}-{bad[0][1]} is out of range for "
                             f"{len(s)} x {len(t)} words")
