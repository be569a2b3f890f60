"""Harness data: each input format with malformed lines (counted, located), sampling, batching, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import load_config
from train.data import DataReport, batch_indices, load_pairs, prepare_language
from train.modeling import build_tiny_model, encode_words, load_tokenizer, token_check
from train.synthetic import ENGLISH_VOCABULARY, synthetic_pairs, word_map

FIXTURES = Path(__file__).parent / "fixtures" / "train"
TINY = Path(__file__).parents[1] / "train" / "configs" / "tiny.yaml"


def test_tsv_counts_every_malformed_line():
    ds, report = load_pairs({"lang": "de", "format": "tsv", "path": "pairs.tsv"}, base_dir=FIXTURES)
    assert ds["source"][:] == ["Das Haus ist rot.", "Ich sehe den Hund."]
    assert ds["target"][:] == ["The house is red.", "I see the dog."]
    assert report.read == 7
    assert report.malformed == {"not two tab-separated fields": 3, "empty source": 1, "empty target": 1}
    assert report.examples["not two tab-separated fields"] == ["pairs.tsv:2", "pairs.tsv:3", "pairs.tsv:6"]
    assert report.read == len(ds) + report.n_malformed


def test_jsonl_with_dotted_fields_counts_malformed_lines():
    spec = {"lang": "de", "format": "jsonl", "path": "pairs.jsonl", "source_field": "translation.de",
            "target_field": "translation.en"}
    ds, report = load_pairs(spec, base_dir=FIXTURES)
    assert list(zip(ds["source"], ds["target"])) == [("Guten Morgen.", "Good morning."),
                                                     ("Wie geht es dir?", "How are you?")]
    assert report.malformed == {"invalid JSON": 2, "missing field translation.en": 1, "non-string field": 1,
                                "empty source": 1}
    assert report.examples["invalid JSON"] == ["pairs.jsonl:2", "pairs.jsonl:5"]
    assert report.read == 7


def test_jsonl_reader_survives_every_per_line_failure(tmp_path):
    lines = ['{"source": "eins", "target": "one"}',
             "[" * 100_000,                                          # RecursionError in json.loads
             '{"source": ' + "1" * 5000 + ', "target": "x"}',        # ValueError: integer over 4300 digits
             '{"source": "\\ud800 zwei", "target": "two"}',           # a lone surrogate: Arrow cannot store it
             '{"source": "drei", "target": "three"}',
             "[" * 100_000 + "]" * 100_000]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    ds, report = load_pairs({"lang": "de", "format": "jsonl", "path": "c.jsonl"}, base_dir=tmp_path)
    assert list(zip(ds["source"], ds["target"], ds["where"])) == [("eins", "one", "c.jsonl:1"),
                                                                  ("drei", "three", "c.jsonl:5")]
    assert report.malformed == {"JSON nested too deeply": 2, "invalid JSON": 1, "invalid Unicode (lone surrogate)": 1}
    assert report.examples["JSON nested too deeply"] == ["c.jsonl:2", "c.jsonl:6"]
    assert report.examples["invalid JSON"] == ["c.jsonl:3"]
    assert report.read == 6 == len(ds) + report.n_malformed


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    ds = synthetic_pairs(200, seed=0)
    return load_tokenizer(build_tiny_model(list(ds["source"]) + list(ds["target"]),
                                           tmp_path_factory.mktemp("tok") / "m", vocab_size=200))


# text -> (why token_check drops it, how it cuts it) at max_length 12
POISON = {"\ufffd\ufffd\ufffd": ("no sub-word token", None),              # what bytes ff fe fd decode to
          "\u200b \u200b\u200b": ("no sub-word token", None),                # zero-width spaces
          "ba" * 50 + " the dog": ("no sub-word token within max_length 12", None),   # first word alone > 10 tokens
          "the dog " + "ba" * 50: (None, "cut to max_length 12 tokens"),     # cut after "the dog": 2 words left
          "the old dog": (None, None)}


def test_token_check_finds_exactly_the_rows_encode_words_leaves_empty_or_cuts(tokenizer):
    check = token_check(tokenizer, max_length=12)
    texts = list(POISON)
    got = check(texts, ["the cat"] * len(texts)) + check(["the cat"] * len(texts), texts)
    assert got == [tuple(None if r is None else f"{side}: {r}" for r in rs) for side in ("source", "target")
                   for rs in POISON.values()]
    long = "the dog " + "ba" * 50
    assert check([long], [long]) == [(None, "source and target: cut to max_length 12 tokens")]
    enc = encode_words(tokenizer, [t.split() for t in texts], max_length=12)     # the independent reference
    empty = [bool((row < 0).all()) for row in enc["word_ids"]]
    assert empty == [drop is not None for drop, _ in POISON.values()]
    assert enc["n_words"].tolist() == [1, 2, 0, 2, 3]                   # a side with no token keeps no word


def test_tsv_lines_the_tokenizer_strips_pass_reading_and_are_dropped_in_preparation(tmp_path, tokenizer):
    good = synthetic_pairs(20, seed=1)
    rows = [f"{s}\t{t}".encode() for s, t in zip(good["source"], good["target"])]
    rows[3] = "\ufffd\ufffd\ufffd\tthe dog sees a cat".encode()         # what an earlier decoding left
    rows[7] = "\u200b\u200b\tthe cat".encode()
    rows[12] = ("the dog\t" + "ba" * 50).encode()
    (tmp_path / "p.tsv").write_bytes(b"\n".join(rows) + b"\n")
    ds, report = load_pairs({"lang": "xx", "format": "tsv", "path": "p.tsv"}, base_dir=tmp_path)
    assert report.malformed == {} and len(ds) == 20                 # the cleaning rules cannot see it
    data = prepare_language(ds, report, pairs_per_language=17, check=token_check(tokenizer, max_length=12))
    assert report.dropped == {"source: no sub-word token": 2, "target: no sub-word token within max_length 12": 1}
    assert report.examples["source: no sub-word token"] == ["p.tsv:4", "p.tsv:8"]        # file order
    assert report.examples["target: no sub-word token within max_length 12"] == ["p.tsv:13"]
    assert report.unique_train == 17 and len(set(data.train)) == 17
    enc = encode_words(tokenizer, [s.split() for pair in data.train for s in pair], max_length=12)
    assert bool((enc["word_ids"].max(1).values >= 0).all())       # every kept side has a word
    assert "no token 3 (source: no sub-word token: 2 at" in report.summary()


def test_lines_that_are_not_utf8_are_malformed_where_they_are_and_a_bom_is_not_part_of_the_text(tmp_path):
    """A Latin-1 line used to become U+FFFD words with malformed 0; a UTF-8 byte-order mark stays out of line 1."""
    (tmp_path / "p.tsv").write_bytes(b"\xef\xbb\xbfDas Haus\tThe house\n" + "Der Bär\tThe bear\r\n".encode("latin-1")
                                     + "Der Bär\tThe bear\r\n".encode())
    ds, report = load_pairs({"lang": "de", "format": "tsv", "path": "p.tsv"}, base_dir=tmp_path)
    assert list(zip(ds["source"], ds["target"], ds["where"])) == [("Das Haus", "The house", "p.tsv:1"),
                                                                  ("Der Bär", "The bear", "p.tsv:3")]
    assert report.read == 3 and report.malformed == {"not valid UTF-8": 1}
    assert report.examples["not valid UTF-8"] == ["p.tsv:2"]
    assert "malformed 1 (not valid UTF-8: 1 at p.tsv:2)" in report.summary()
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"source": "eins", "target": "one"}\n{"source": "\xe4", '
                                       b'"target": "a"}\n')
    ds, report = load_pairs({"lang": "de", "format": "jsonl", "path": "p.jsonl"}, base_dir=tmp_path)
    assert ds["source"] == ["eins"] and report.malformed == {"not valid UTF-8": 1}
    assert report.examples["not valid UTF-8"] == ["p.jsonl:2"]
    (tmp_path / "m.de").write_bytes("eins\nzwei\u2028drei\n".encode())
    (tmp_path / "m.en").write_bytes(b"one\ntw\xf6\n")
    ds, report = load_pairs({"lang": "de", "format": "moses", "source_path": "m.de", "target_path": "m.en"},
                            base_dir=tmp_path)
    assert ds["source"] == ["eins"] and report.read == 2
    assert report.examples["not valid UTF-8"] == ["m.en:2"]


def test_pairs_cut_to_max_length_are_counted_as_edited_where_they_are(tmp_path, tokenizer):
    """Training pairs longer than model.max_length lost their last words without a count."""
    good = synthetic_pairs(20, seed=2)
    rows = [f"{s}\t{t}" for s, t in zip(good["source"], good["target"])]
    long = " ".join(" ".join(good["target"]).split()[:60])
    for i in (4, 11):
        rows[i] = f"{good['source'][i]}\t{long}"
    (tmp_path / "p.tsv").write_text("\n".join(rows) + "\n")
    ds, report = load_pairs({"lang": "xx", "format": "tsv", "path": "p.tsv"}, base_dir=tmp_path)
    prepare_language(ds, report, pairs_per_language=20, max_words=64, check=token_check(tokenizer, max_length=40))
    enc = encode_words(tokenizer, [r.split("\t")[1].split() for r in rows], max_length=40)   # the reference
    assert [i for i, n in enumerate(enc["n_words"].tolist()) if n < len(rows[i].split("\t")[1].split())] == [4, 11]
    assert report.edited == {"target: cut to max_length 40 tokens": 2} and report.dropped == {}
    assert report.examples["target: cut to max_length 40 tokens"] == ["p.tsv:5", "p.tsv:12"]
    assert "edited 2 (target: cut to max_length 40 tokens: 2 at p.tsv:5, p.tsv:12)" in report.summary()


def test_moses_pair_of_files_counts_unpaired_and_empty_lines():
    spec = {"lang": "fr", "format": "moses", "source_path": "corpus.fr", "target_path": "corpus.en"}
    ds, report = load_pairs(spec, base_dir=FIXTURES)
    assert list(zip(ds["source"], ds["target"])) == [("Le chat dort.", "The cat sleeps."), ("Bonjour !", "Hello!")]
    assert report.malformed == {"empty source": 1, "empty target": 1, "unpaired line (files differ in length)": 1}
    assert report.examples["unpaired line (files differ in length)"] == ["corpus.fr:5"]
    assert report.read == 5


def test_hub_code_path_through_load_dataset(tmp_path):
    rows = [{"translation": {"es": "Hola.", "en": "Hello."}}, {"translation": {"es": "Adiós.", "en": ""}},
            {"translation": {"en": "Only English."}}]
    (tmp_path / "opus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {"lang": "es", "format": "hub", "path": "json",
            "load_kwargs": {"data_files": str(tmp_path / "opus.jsonl"), "cache_dir": str(tmp_path / "cache")}}
    ds, report = load_pairs(spec)
    assert list(zip(ds["source"], ds["target"])) == [("Hola.", "Hello.")]
    assert report.malformed == {"empty target": 1, "missing field translation.es": 1}
    assert report.examples["missing field translation.es"] == ["row 2"]


@pytest.mark.parametrize("spec, error", [
    ({"format": "tsv", "path": "x"}, ValueError),
    ({"lang": "de", "format": "csv"}, ValueError),
    ({"lang": "de", "format": "moses", "source_path": "corpus.fr"}, ValueError),
    ({"lang": "de", "format": "tsv", "path": "missing.tsv"}, FileNotFoundError),
])
def test_bad_specs_raise_naming_the_problem(spec, error):
    with pytest.raises(error, match="lang|format|target_path|missing.tsv"):
        load_pairs(spec, base_dir=FIXTURES)


@pytest.mark.parametrize("key, value", [("n_pairs", "abc"), ("seed", 1.5), ("map_seed", True)])
def test_a_synthetic_count_or_seed_that_is_no_integer_is_named(key, value):
    spec = {"lang": "xx", "format": "synthetic", "n_pairs": 10, key: value}
    with pytest.raises(ValueError, match=rf"^data.languages\[xx\].{key} must be an integer, got {value!r}$"):
        load_pairs(spec)


@pytest.mark.parametrize("spec, key, allowed", [
    ({"lang": "yy", "format": "synthetic", "n_pairs": 10, "mapseed": 7}, "mapseed",
     "format, lang, map_seed, n_pairs, seed"),
    ({"lang": "de", "format": "tsv", "path": "pairs.tsv", "source_field": "de"}, "source_field", "format, lang, path"),
])
def test_a_key_the_format_does_not_take_is_an_error_naming_it_and_the_allowed_ones(spec, key, allowed):
    with pytest.raises(ValueError, match=rf"^data.languages\[{spec['lang']}\]: unknown key '{key}' for format "
                                         rf"{spec['format']} \(allowed: {allowed}\)$"):
        load_pairs(spec, base_dir=FIXTURES)


def test_synthetic_pair_is_a_bijection_with_local_reordering():
    mapping = word_map(1234)
    assert len(set(mapping.values())) == len(ENGLISH_VOCABULARY)
    assert not set(mapping.values()) & set(ENGLISH_VOCABULARY)
    inverse = {v: k for k, v in mapping.items()}
    ds = synthetic_pairs(50, seed=3)
    assert ds[:] == synthetic_pairs(50, seed=3)[:]
    assert ds[:] != synthetic_pairs(50, seed=4)[:]
    for source, target in zip(ds["source"], ds["target"]):
        back = [inverse[w] for w in source.split()]
        assert sorted(back) == sorted(target.split())        # same words, reordered
        english = target.split()                             # local: every word within 2 places
        assert all(w in english[max(0, i - 2):i + 3] for i, w in enumerate(back))


def test_prepare_upsamples_filters_and_holds_out():
    rows = {"source": ["a b", "c d e", "f", "g h i j k l"], "target": ["A B", "C D E", "F", "G H"]}
    import datasets

    report = DataReport("xx", read=4)
    data = prepare_language(datasets.Dataset.from_dict(rows), report, pairs_per_language=7, eval_pairs=1,
                            min_words=2, max_words=4, seed=0)
    held = set(data.held_out)
    assert len(held) == 1 and report.held_out == 1
    eligible = {("a b", "A B"), ("c d e", "C D E")} - held   # "f" too short, "g h i j k l" too long
    assert report.filtered == 3 - len(eligible)
    assert set(data.train) == eligible and report.unique_train == len(eligible)
    assert len(data.train) == 7 == report.train
    counts = [data.train.count(p) for p in eligible]
    assert max(counts) - min(counts) <= 1                       # upsampled evenly


def test_moses_tokenisation_splits_punctuation():
    import datasets

    ds = datasets.Dataset.from_dict({"source": ["L'homme, ici."], "target": ["The man, here."]})
    data = prepare_language(ds, DataReport("fr"), pairs_per_language=1)
    assert data.train == [("L' homme , ici .", "The man , here .")]


def test_batches_partition_each_global_batch_and_epochs_reshuffle():
    n, bs, world = 50, 4, 3
    per_epoch = n // (bs * world)
    for step in range(2 * per_epoch):
        parts = [batch_indices(n, micro_step=step, batch_size=bs, num_processes=world, process_index=r, seed=1)
                 for r in range(world)]
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) == bs * world
    epoch0 = [i for s in range(per_epoch) for i in batch_indices(n, micro_step=s, batch_size=bs,
                                                                 num_processes=1, process_index=0, seed=1)]
    epoch1 = [i for s in range(per_epoch, 2 * per_epoch)
              for i in batch_indices(n, micro_step=s, batch_size=bs, num_processes=1, process_index=0, seed=1)]
    assert len(set(epoch0)) == len(epoch0) and epoch0 != epoch1
    with pytest.raises(ValueError, match="global batch"):
        batch_indices(5, micro_step=0, batch_size=4, num_processes=2, process_index=0, seed=0)


def test_config_overrides_types_and_typos():
    cfg = load_config(TINY, ["--train.lr", "3e-4", "--loss.granularity", "batch", "--train.max-steps", "null"],
                      output_dir="elsewhere")
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["loss"]["granularity"] == "batch" and cfg["train"]["max_steps"] is None
    assert cfg["output_dir"] == "elsewhere"
    with pytest.raises(ValueError, match="train.lrr"):
        load_config(TINY, ["--train.lrr", "1"])
    with pytest.raises(ValueError, match="granularity"):
        load_config(TINY, ["--loss.granularity", "word"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        load_config(TINY, ["--train.batch_size", "many"])


@pytest.mark.parametrize("name, langs", [
    ("paper_wordot", ["bg", "de", "el", "es", "fr"]),
    ("paper_large", ["bg", "de", "el", "es", "fr", "ar", "ru", "zh", "hi", "th", "tr", "vi", "ur", "sw"]),
])
def test_paper_configs_carry_the_papers_recipe(name, langs):
    cfg = load_config(TINY.parent / f"{name}.yaml")
    assert [spec["lang"] for spec in cfg["data"]["languages"]] == langs
    assert all(spec["format"] == "hub" and "en" in spec["name"].split("-") for spec in cfg["data"]["languages"])
    assert cfg["model"]["name_or_path"] == "bert-base-multilingual-cased"
    assert (cfg["model"]["layer"], cfg["model"]["word_mode"]) == (-1, "last")
    assert cfg["data"]["pairs_per_language"] == 250_000
    assert cfg["loss"] == {"granularity": "sentence", "cost": "sqeuclidean", "blur": 0.05, "scaling": 0.5,
                           "debias": True, "backend": "auto", "check_inputs": True, "reg_lambda": 1.0}
    t = cfg["train"]
    assert (t["lr"], t["batch_size"], t["grad_accum"], t["epochs"], t["max_steps"]) == (5e-5, 24, 2, 1, None)
