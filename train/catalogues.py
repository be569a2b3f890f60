"""Parallel pairs from compiled gettext catalogues (``.mo``), the translations that Debian packages install.

``/usr/share/locale/<lang>/LC_MESSAGES/*.mo`` maps every English message of a program (``msgid``) to its
translation (``msgstr``): real, human-translated sentence pairs on any Debian system, in the languages
whose catalogues are installed. Messages are not sentences of running text, so ``read_catalogues``
cleans them and counts what it does, per reason, with the first locations (``file.mo#N``: the N-th
entry of the catalogue's table, 0 being the header):

- kept after an edit (``DataReport.edited``): a plural message (its singular and first translated form
  are used), format placeholders removed (``%s``, ``%1$d``, ``%(name)s``, ``{0}``, ``%pB``; ``%%``
  reads as ``%``, until nothing changes: git formats some messages twice, ``%%s``; the space flag is
  not read, so ``50% done`` stays), a multi-line message (its lines joined by spaces, as all whitespace is collapsed);
- not used (``DataReport.malformed``): an empty translation, text that is not valid in the
  catalogue's charset, a side with no letter once the placeholders are gone, a translation equal to
  the English up to case (untranslated names), an English message already seen (in this or an earlier
  catalogue: held-out pairs then never repeat a training pair's English side), and a file that is not
  a readable catalogue.

The header entry (``msgid ""``, the catalogue's metadata) is not a message and is not counted;
message context (``msgctxt``) is dropped from the key.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Iterator
from pathlib import Path

MAGIC = 0x950412DE
PLACEHOLDER = re.compile(
    r"%%"                                                           # a literal percent sign
    r"|%(?:\d+\$)?p[A-Z]"                                           # binutils' %pA, %pB, ...
    r"|%\(\w+\)[-+#0]*\d*(?:\.\d+)?[a-zA-Z]"                        # Python's %(name)s
    r"|%(?:\d+\$)?[-+#0'I]*(?:\d+|\*(?:\d+\$)?)?(?:\.(?:\d+|\*(?:\d+\$)?))?(?:hh|ll|[hlLqjzZt])?"
    r"[diouxXeEfFgGaAcCsSpnm]"                                     # C printf
    r"|%<PRI\w+>"                                                   # gettext's system-dependent <PRIu64>
    r"|\{\w*(?:\.\w+)*(?:![rsa])?(?::[^{}]*)?\}")                   # str.format / brace styles


def read_mo(path: Path) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The raw entries of one compiled catalogue.

    Args:
        path: a ``.mo`` file (either byte order, format revision 0 or 1).

    Returns:
        ``(charset, [(msgid, msgstr), ...])`` in table order; the charset is the header's
        ``Content-Type`` charset (UTF-8 when it names none).

    Raises:
        ValueError: if the file is not a readable catalogue (bad magic number, unknown revision, a table
            or a string outside the file).
    """
    data = path.read_bytes()
    if len(data) < 20:
        raise ValueError("shorter than a catalogue header")
    for order in "<>":
        if struct.unpack(order + "I", data[:4])[0] == MAGIC:
            break
    else:
        raise ValueError("not a .mo file (bad magic number)")
    revision, n, ids_at, strs_at = struct.unpack(order + "4I", data[4:20])
    if revision >> 16 not in (0, 1):
        raise ValueError(f"unknown format revision {revision >> 16}")

    def string(table: int, i: int) -> bytes:
        at = table + 8 * i
        if at + 8 > len(data):
            raise ValueError(f"string table entry {i} outside the file")
        length, offset = struct.unpack(order + "2I", data[at:at + 8])
        if offset + length > len(data):
            raise ValueError(f"string {i} outside the file")
        return data[offset:offset + length]

    entries = [(string(ids_at, i), string(strs_at, i)) for i in range(n)]
    charset = "utf-8"
    for msgid, msgstr in entries:
        if msgid == b"":
            found = re.search(rb"charset=([\w.:-]+)", msgstr)
            if found and found.group(1).upper() != b"CHARSET":      # "CHARSET" is the template's placeholder
                charset = found.group(1).decode("ascii")
    return charset, entries


def _clean(text: str) -> tuple[str, bool, bool]:
    """``(text without placeholders, whitespace collapsed; whether a placeholder was removed; whether it
    had several lines)``."""
    found = False

    def replace(match: re.Match) -> str:
        nonlocal found
        if match.group() == "%%":
            return "%"
        found = True
        return " "

    multi_line = "\n" in text.strip()
    cleaned = PLACEHOLDER.sub(replace, text)
    while cleaned != text:                   # "%%s" (formatted twice, as git does) is "%s" after one pass
        text, cleaned = cleaned, PLACEHOLDER.sub(replace, cleaned)
    return " ".join(cleaned.split()), found, multi_line


def _messages(path: Path, report, label: str) -> Iterator[tuple[str, str, str, list[str]]]:
    """``(msgstr, msgid, location, edits)`` of one catalogue's usable messages; the rest counted."""
    try:
        charset, entries = read_mo(path)
        codecs.lookup(charset)
    except (OSError, ValueError, LookupError) as exc:
        report.read += 1
        report.add_malformed(f"not a readable catalogue ({type(exc).__name__}: {exc})", label)
        return
    for i, (msgid, msgstr) in enumerate(entries):
        if msgid == b"":
            continue
        report.read += 1
        where = f"{label}#{i}"
        try:
            english, translation = msgid.decode(charset), msgstr.decode(charset)
        except UnicodeDecodeError:
            report.add_malformed(f"not valid {charset}", where)
            continue
        english = english.split("\x04")[-1]                            # drop the msgctxt
        edits = []
        if "\x00" in english:
            english, translation = english.split("\x00")[0], translation.split("\x00")[0]
            edits.append("plural message: singular form used")
        if not translation.strip():
            report.add_malformed("empty translation", where)
            continue
        (english, placeholder_en, lines_en), (translation, placeholder_tr, lines_tr) = \
            _clean(english), _clean(translation)
        if placeholder_en or placeholder_tr:
            edits.append("format placeholders removed")
        if lines_en or lines_tr:
            edits.append("multi-line message: lines joined")
        if not any(c.isalpha() for c in english) or not any(c.isalpha() for c in translation):
            report.add_malformed("no letter on a side (placeholders and punctuation only)", where)
            continue
        if translation.casefold() == english.casefold():
            report.add_malformed("untranslated (the same as the English)", where)
            continue
        yield translation, english, where, edits


def read_catalogues(path: Path, report, out: dict[str, list[str]]) -> None:
    """Append the pairs of every catalogue under ``path`` to ``out`` (``source`` = translation, ``target`` =
    English, ``where``) and count what happened in ``report`` (a ``train.data.DataReport``).

    Args:
        path: a ``.mo`` file, or a folder whose ``*.mo`` files are read in name order.
        report: updated in place (``read``, ``malformed``, ``edited``, ``examples``).
        out: rows, as ``train.data`` builds them.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a folder holds no ``.mo`` file.
    """
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder {path}")
    files = sorted(path.glob("*.mo")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no .mo catalogue in {path}: install packages that ship translations for this language "
                         "(on Debian most programs carry theirs), or point 'path' at another folder")
    seen: set[str] = set()
    for file in files:
        for translation, english, where, edits in _messages(file, report, file.name):
            if english in seen:
                report.add_malformed("duplicate English message", where)
                continue
            seen.add(english)
            for reason in edits:
                report.add_edited(reason, where)
            out["source"].append(translation)
            out["target"].append(english)
            out["where"].append(where)
