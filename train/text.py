"""Reading text files line by line, as the harness's plain-text readers (parallel data, alignments) do."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path


def text_lines(path: str | Path) -> Iterator[str | None]:
    """The lines of a UTF-8 file without their ends (LF or CR LF); None for a line that is not valid UTF-8.

    Only LF ends a line (U+2028, U+0085 or a lone CR inside a sentence does not, where ``str.splitlines`` would
    split it and shift every later line), and a byte-order mark at the start of the file is not part of its
    first line.
    """
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            if i == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                yield None
