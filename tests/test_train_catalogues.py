"""Pairs from gettext catalogues (``format: gettext``): a hand-made catalogue with every odd entry real ones
hold, read against Python's own ``gettext`` module (the installed catalogues: ``test_train_real.py``)."""

from __future__ import annotations

import gettext
import struct
from pathlib import Path

import pytest

from train.catalogues import MAGIC, read_mo
from train.data import load_pairs

HEADER = (b"", b"Project-Id-Version: demo\nContent-Type: text/plain; charset=UTF-8\n")
ENTRIES = [  # (msgid, msgstr), as msgfmt writes them: NUL between plural forms, EOT after a msgctxt
    HEADER,
    (b"%s: cannot open %s", "%s : impossible d'ouvrir %s".encode()),
    (b"Cancel", b"Annuler"),
    (b"Usage: prog [OPTION]\nCopy files.\n", b"Utilisation : prog [OPTION]\nCopier des fichiers.\n"),
    (b"File", b""),
    (b"Linux", b"linux"),
    (b"%d%%", b"%d %%"),
    (b"menu\x04Open", b"Ouvrir"),
    (b"one file\x00%d files", b"un fichier\x00%d fichiers"),
    (b"Progress: {percent} done, %(count)d left, 100%% sure", "Progression : {percent} fait, %(count)d restants, "
                                                              "sûr à 100%%".encode()),
    (b"Bad bytes", b"Mauvais \xff octets"),
]
LATIN1 = [(b"", b"Content-Type: text/plain; charset=ISO-8859-1\n"), (b"Previous", "Précédent".encode("latin-1")),
          (b"Cancel", b"Abandonner")]


def write_mo(path: Path, entries: list[tuple[bytes, bytes]], order: str = "<") -> Path:
    """A compiled catalogue (GNU .mo, revision 0, no hash table) of ``(msgid, msgstr)`` in the given order."""
    n = len(entries)
    ids_at, strs_at = 28, 28 + 8 * n
    blob, table = b"", []
    for side in (0, 1):
        for entry in entries:
            table.append((len(entry[side]), strs_at + 8 * n + len(blob)))
            blob += entry[side] + b"\0"
    head = struct.pack(order + "7I", MAGIC, 0, n, ids_at, strs_at, 0, 0)
    path.write_bytes(head + b"".join(struct.pack(order + "2I", *e) for e in table) + blob)
    return path


def test_raw_entries_match_pythons_gettext(tmp_path):
    for order in "<>":
        good = write_mo(tmp_path / f"good{order == '>'}.mo", ENTRIES[:-1], order)
        latin = write_mo(tmp_path / f"latin{order == '>'}.mo", LATIN1, order)
        for path in (good, latin):
            charset, entries = read_mo(path)
            with open(path, "rb") as fh:
                reference = gettext.GNUTranslations(fh)._catalog        # the independent reader
            decoded = {}
            for msgid, msgstr in entries:
                key, forms = msgid.decode(charset), msgstr.decode(charset).split("\x00")
                if "\x00" in key:
                    decoded.update({(key.split("\x00")[0], i): form for i, form in enumerate(forms)})
                else:
                    decoded[key] = forms[0]
            assert decoded == reference


def test_every_odd_entry_is_counted_where_it_is(tmp_path):
    folder = tmp_path / "LC_MESSAGES"
    folder.mkdir()
    write_mo(folder / "a.mo", ENTRIES)
    write_mo(folder / "b.mo", LATIN1, ">")
    (folder / "c.mo").write_bytes(b"not a catalogue at all")
    (folder / "notes.txt").write_text("ignored: not a .mo file")
    ds, report = load_pairs({"lang": "fr", "format": "gettext", "path": str(folder)})
    assert list(zip(ds["source"], ds["target"], ds["where"])) == [
        (": impossible d'ouvrir", ": cannot open", "a.mo#1"),
        ("Annuler", "Cancel", "a.mo#2"),
        ("Utilisation : prog [OPTION] Copier des fichiers.", "Usage: prog [OPTION] Copy files.", "a.mo#3"),
        ("Ouvrir", "Open", "a.mo#7"),
        ("un fichier", "one file", "a.mo#8"),
        ("Progression : fait, restants, sûr à 100%", "Progress: done, left, 100% sure", "a.mo#9"),
        ("Précédent", "Previous", "b.mo#1")]
    assert report.read == 10 + 2 + 1 == len(ds) + report.n_malformed
    assert report.malformed == {"empty translation": 1, "untranslated (the same as the English)": 1,
                                "no letter on a side (placeholders and punctuation only)": 1, "not valid UTF-8": 1,
                                "duplicate English message": 1,
                                "not a readable catalogue (ValueError: not a .mo file (bad magic number))": 1}
    assert report.edited == {"format placeholders removed": 2, "multi-line message: lines joined": 1,
                             "plural message: singular form used": 1}
    assert report.examples["format placeholders removed"] == ["a.mo#1", "a.mo#9"]
    assert report.examples["duplicate English message"] == ["b.mo#2"]
    assert report.examples["empty translation"] == ["a.mo#4"]
    assert report.examples["not valid UTF-8"] == ["a.mo#10"]
    assert "edited 4 (format placeholders removed: 2 at a.mo#1, a.mo#9, multi-line" in report.summary()


def test_a_folder_without_catalogues_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no .mo catalogue in .*install packages that ship translations"):
        load_pairs({"lang": "fr", "format": "gettext", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_pairs({"lang": "fr", "format": "gettext", "path": str(tmp_path / "missing")})

