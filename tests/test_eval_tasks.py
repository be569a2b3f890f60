"""The evaluation tasks end to end on the fixtures and a tiny model built on the fly, against values
computed independently here (gold labels read with csv/json, retrieval and alignment cases built to
have a known answer, spans located by hand)."""

import csv
import json
import statistics
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from train.eval import report, squad, xnli, xquad
from train.evaluate import main
from train.modeling import build_tiny_model
from train.synthetic import synthetic_pairs

FIX = Path(__file__).parent / "fixtures" / "eval"
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    ds = synthetic_pairs(200, seed=0)
    return str(build_tiny_model(list(ds["source"]) + list(ds["target"]) + ["who ?"],
                                tmp_path_factory.mktemp("tiny") / "model", vocab_size=300))


def _tiny_cfg(name, **overrides):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["data"] = {k: str(Path(__file__).resolve().parents[1] / v) for k, v in cfg["data"].items()}
    cfg.update(overrides)
    return cfg


def _gold_labels(language):
    with open(FIX / "xnli.test.tsv", newline="") as fh:
        return [r["gold_label"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
                if r["language"] == language]


def test_read_nli_files():
    xx = xnli.read_nli_file(FIX / "xnli.test.tsv", "xx")
    assert len(xx) == 12 and [e["label"] for e in xx] == [xnli.LABELS.index(g) for g in _gold_labels("xx")]
    train = xnli.read_nli_file(FIX / "xnli_train.en.jsonl")
    assert len(train) == 48 and {e["label"] for e in train} == {0, 1, 2}
    with open(FIX / "xnli.dev.tsv", newline="") as fh:
        first_en = next(r for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r["language"] == "en")
    dev = xnli.load_nli(str(FIX / "xnli.dev.tsv"), "dev", "en")
    assert (dev[0]["premise"], dev[0]["hypothesis"]) == (first_en["sentence1"], first_en["sentence2"])


def test_nli_labels_and_bad_rows(tmp_path):
    f = tmp_path / "x.tsv"
    f.write_text("premise\thypothesis\tlabel\na\tb\tcontradictory\nc\td\t-\ne\tf\t1\n")
    assert [e["label"] for e in xnli.read_nli_file(f)] == [2, 1]      # "-" (no consensus) skipped
    f.write_text("premise\thypothesis\tlabel\na\tb\tmaybe\n")
    with pytest.raises(ValueError, match="unknown NLI label 'maybe'"):
        xnli.read_nli_file(f)
    f.write_text("text\tlabel\na\t0\n")
    with pytest.raises(ValueError, match="no premise/hypothesis"):
        xnli.read_nli_file(f)
    with pytest.raises(ValueError, match="no example for language 'zz'"):
        xnli.read_nli_file(FIX / "xnli.test.tsv", "zz")
    f.write_text("premise\thypo\tlabel\na\tb\tcontradictory\n")          # XNLI-MT-1.0's multinli.train.LANG.tsv
    assert xnli.read_nli_file(f) == [{"premise": "a", "hypothesis": "b", "label": 2}]


def test_a_bom_keeps_the_language_column_and_a_test_file_without_one_is_an_error(tmp_path):
    """A byte-order mark made the header key '\\ufefflanguage', so every row was scored for every language."""
    bom = tmp_path / "xnli.test.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + (FIX / "xnli.test.tsv").read_bytes())
    xx = xnli.read_nli_file(bom, "xx")
    assert [e["label"] for e in xx] == [xnli.LABELS.index(g) for g in _gold_labels("xx")]
    assert xnli.load_nli(str(bom), "test", "en") == xnli.read_nli_file(FIX / "xnli.test.tsv", "en")
    plain = tmp_path / "test.tsv"                        # the same rows without the column
    with open(FIX / "xnli.test.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    plain.write_text("gold_label\tsentence1\tsentence2\n" +
                     "".join(f"{r['gold_label']}\t{r['sentence1']}\t{r['sentence2']}\n" for r in rows))
    with pytest.raises(ValueError, match=r"test.tsv: no 'language' column to pick language 'xx' from \(columns: "
                                         r"gold_label, sentence1, sentence2\); give a file per language"):
        xnli.load_nli(str(plain), "test", "xx")
    assert len(xnli.load_nli(str(plain), "train", "en")) == len(rows)      # training data: one language
    plain.rename(tmp_path / "test-xx.tsv")                                 # a file per language
    assert len(xnli.load_nli(str(tmp_path / "test-{lang}.tsv"), "test", "xx")) == len(rows)


def test_a_folder_named_like_a_hub_data_set_is_not_a_local_file(tmp_path, monkeypatch):
    """A folder ``xnli`` in the working directory made ``data.test: xnli`` open it as a file (IsADirectoryError)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xnli").mkdir()
    (tmp_path / "squad").mkdir()
    assert not xnli.is_local("xnli", "fr") and not xnli.is_local("squad", "en")
    (tmp_path / "test-fr").write_bytes((FIX / "xnli.test.tsv").read_bytes())   # a file without a suffix is one
    assert xnli.is_local("test-{lang}", "fr") and not xnli.is_local("test-{lang}", "de")


def test_xnli_run_matches_written_predictions(tiny_model, tmp_path):
    cfg = _tiny_cfg("eval_xnli_tiny.yaml", seeds=[1, 2], epochs=2, eval_steps=2)
    res = xnli.run(cfg, tiny_model, tmp_path, log=lambda m: None)
    for lang in ("en", "xx"):
        gold = _gold_labels(lang)
        per_seed = []
        for seed in (1, 2):
            pred = (tmp_path / "predictions" / str(seed) / f"{lang}.txt").read_text().split()
            per_seed.append(100 * sum(p == g for p, g in zip(pred, gold)) / len(gold))
        got = res["languages"][lang]["accuracy"]
        assert got["per_seed"] == pytest.approx(per_seed)
        assert got["mean"] == pytest.approx(statistics.fmean(per_seed))
    acc = {lang: res["languages"][lang]["accuracy"]["mean"] for lang in ("en", "xx")}
    assert res["averages"]["seen"]["accuracy"] == pytest.approx(acc["xx"])
    assert res["averages"]["all"]["accuracy"] == pytest.approx((acc["en"] + acc["xx"]) / 2)
    assert all(r["best_update"] is not None for r in res["train_runs"])   # selected on English dev


def _long_record():
    context = " ".join(synthetic_pairs(6, seed=3)["target"]) + " the answer is here ."
    start = context.index("answer is here")
    return {"id": "long", "title": "", "context": context, "question": "where is it ?",
            "answers": {"text": ["answer is here"], "answer_start": [start]}}


def test_qa_windows_and_answer_positions(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = _long_record()
    feats = xquad.qa_features(tok, [rec], max_seq_length=32, doc_stride=8, max_query_length=4, train=True)
    assert len(feats) > 2 and all(len(f["input_ids"]) <= 32 for f in feats)
    firsts = [next(o for o in f["offsets"] if o is not None)[0] for f in feats]
    context_tokens = tok(rec["context"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [o[0] for o in context_tokens]
    assert [starts.index(c) for c in firsts] == [8 * k for k in range(len(feats))]   # windows doc_stride apart
    hits = [f for f in feats if f["start_positions"] != 0]
    assert hits, "some window holds the whole answer"
    for f in hits:
        span = rec["context"][f["offsets"][f["start_positions"]][0]:f["offsets"][f["end_positions"]][1]]
        assert span == "answer is here"
    for f in feats:
        if f["start_positions"] == 0:
            ctx = [o for o in f["offsets"] if o is not None]
            s = rec["answers"]["answer_start"][0]
            assert ctx[0][0] > s or ctx[-1][1] < s + len("answer is here")
    for tok_offset in {o for f in feats for o in f["offsets"] if o is not None}:
        assert sum(f["max_context"][f["offsets"].index(tok_offset)] for f in feats if tok_offset in f["offsets"]) == 1


def test_qa_postprocess_known_span(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = _long_record()
    train = xquad.qa_features(tok, [rec], max_seq_length=32, doc_stride=8, max_query_length=4, train=True)
    feats = xquad.qa_features(tok, [rec], max_seq_length=32, doc_stride=8, max_query_length=4, train=False)
    logits = []
    for tf, f in zip(train, feats):
        s, e = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        if tf["start_positions"] and f["max_context"][tf["start_positions"]]:
            s[tf["start_positions"]], e[tf["end_positions"]] = 10.0, 10.0
        logits.append((s, e))
    preds = xquad.postprocess([rec], feats, logits)
    assert preds == {"long": "answer is here"}
    assert squad.score([("long", ["answer is here"])], preds) == {"exact_match": 100.0, "f1": 100.0}
    short = xquad.postprocess([rec], feats, logits, max_answer_length=1)
    assert short["long"] != "answer is here"          # a 3-word span is refused at max_answer_length=1


def test_xquad_run_matches_scorer(tiny_model, tmp_path):
    cfg = _tiny_cfg("eval_xquad_tiny.yaml", epochs=1)
    res = xquad.run(cfg, tiny_model, tmp_path, log=lambda m: None)
    for lang in ("en", "xx"):
        data = squad.load_squad_file(FIX / f"xquad.{lang}.json")
        preds = json.loads((tmp_path / "predictions" / "1" / f"{lang}.json").read_text())
        assert set(preds) == {qa["id"] for _, _, qa in squad.iter_questions(data)}
        want = squad.evaluate(data, preds)
        got = res["languages"][lang]
        assert got["f1"]["mean"] == pytest.approx(want["f1"])
        assert got["exact_match"]["mean"] == pytest.approx(want["exact_match"])


def test_xquad_refuses_one_local_file_for_several_languages_and_reads_left_padded_logits(tiny_model, tmp_path):
    """A local test path without {lang} was read for every language (each language scored on one file's
    questions); and the logits of a feature are its own tokens', wherever the tokenizer pads (the collators pad on
    the right whatever its side: BERT numbers positions 0..T-1 whatever the padding)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    cfg = _tiny_cfg("eval_xquad_tiny.yaml", epochs=1)
    cfg["data"]["test"] = cfg["data"]["test"].replace("{lang}", "xx")
    with pytest.raises(ValueError, match="is one local file, for 2 languages"):
        xquad.run(cfg, tiny_model, tmp_path, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    feats = xquad.qa_features(tok, [_long_record()], max_seq_length=32, doc_stride=8, max_query_length=4,
                              train=False)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_model).eval()
    assert len({len(f["input_ids"]) for f in feats}) > 1                  # some features are padded
    runs = []
    for side in ("right", "left"):
        tok.padding_side = side
        for collate in (xquad.collator(tok), xnli.collator(tok)):         # BERT's positions: padding on the right
            mask = collate([{"input_ids": f["input_ids"], "labels": 0} for f in feats])["attention_mask"]
            assert torch.equal(mask, mask.sort(dim=1, descending=True).values), side
        runs.append(xquad.predict_logits(model, feats, xquad.collator(tok), 4))
    for (s1, e1), (s2, e2), f in zip(*runs, feats):
        assert len(s1) == len(f["input_ids"]) and np.allclose(s1, s2, atol=1e-5) and np.allclose(e1, e2, atol=1e-5)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_retrieval_known_answers(tiny_model, tmp_path, capsys):
    sents = list(dict.fromkeys(synthetic_pairs(30, seed=5)["target"]))[:12]
    same = _write_lines(tmp_path / "s.txt", sents)
    rotated = _write_lines(tmp_path / "r.txt", sents[1:] + sents[:1])   # target j = sentence j + 1
    res = main(["retrieval", "--model", tiny_model, "--source", same, "--target", same])
    assert res["languages"]["xx"]["mean"]["mean"] == 1.0
    res = main(["retrieval", "--model", tiny_model, "--source", same, "--target", rotated])
    assert res["languages"]["xx"]["src2tgt"]["mean"] == 0.0 and res["languages"]["xx"]["tgt2src"]["mean"] == 0.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "retrieval"


def test_align_identical_sentences_gives_the_diagonal(tiny_model, tmp_path):
    sents = ["the old cat sees a dog", "every bird sings", "my small house near the river today"]
    src = _write_lines(tmp_path / "s.txt", sents)
    gold = _write_lines(tmp_path / "g.txt", [" ".join(f"{i}-{i}" for i in range(len(s.split()))) for s in sents])
    out = tmp_path / "pred.txt"
    res = main(["align", "--model", tiny_model, "--source", src, "--target", src, "--output", str(out),
                "--gold", gold, "--eps", "0.01"])
    assert out.read_text() == Path(gold).read_text()
    assert res["aer"] == 0.0 and res["precision"] == 1.0 and res["recall"] == 1.0


def test_align_names_the_pair_whose_sentence_has_no_token(tiny_model, tmp_path):
    """A sentence the tokenizer strips whole (a zero-width space) failed inside the plan as "pair at batch index 0",
    its place in its batch of --batch-size pairs, not in the files."""
    src = _write_lines(tmp_path / "s.txt", ["every bird sings", "the old cat", "a dog"])
    tgt = _write_lines(tmp_path / "t.txt", ["every bird sings", "the old cat", "\u200b"])
    with pytest.raises(ValueError, match="^pair 3: no word of its target sentence has a sub-word token"):
        main(["align", "--model", tiny_model, "--source", src, "--target", tgt, "--batch-size", "2"])


def test_align_says_how_much_it_cut_and_a_max_length_above_the_model_is_its_limit(tiny_model, tmp_path, capsys):
    """--max-length 16 used to drop the words of a 40-word pair past 14 sub-words without a word; 1000 (the tiny
    model takes 64 positions) crashed inside the model."""
    from transformers import AutoTokenizer

    words = " ".join(synthetic_pairs(40, seed=7)["target"]).split()
    long, short = " ".join(words[:40]), " ".join(words[40:42])
    src = _write_lines(tmp_path / "s.txt", [long, short])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    owners = tok(words[:40], is_split_into_words=True, add_special_tokens=False).word_ids()
    kept = owners[16 - 2]                                  # the first word without room for all its sub-words
    res = main(["align", "--model", tiny_model, "--source", src, "--target", src, "--max-length", "16"])
    assert (res["max_length"], res["truncated_pairs"], res["truncated_words"]) == (16, 1, 2 * (40 - kept))
    assert capsys.readouterr().err.startswith(f"align: 1 of 2 pairs have a sentence longer than --max-length 16 "
                                              f"tokens, cut at a word boundary: their last {2 * (40 - kept)} words")
    assert len(tok(words, is_split_into_words=True)["input_ids"]) > 64
    everything = _write_lines(tmp_path / "all.txt", [" ".join(words)])
    res = main(["align", "--model", tiny_model, "--source", everything, "--target", everything, "--max-length", "1000"])
    assert res["max_length"] == 64 and res["truncated_pairs"] == 1
    assert capsys.readouterr().err.startswith(f"note: --max-length 1000 is more than {tiny_model} takes (64 tokens): "
                                              "using 64\nalign: 1 of 1 pairs have a sentence longer than --max-length "
                                              "64 tokens")
    res = main(["retrieval", "--model", tiny_model, "--source", everything, "--target", everything])
    assert res["max_length"] == 64 and res["languages"]["xx"]["mean"]["mean"] == 1.0      # the default: silently
    assert capsys.readouterr().err == ""
    res = main(["retrieval", "--model", tiny_model, "--source", everything, "--target", everything,
                "--max-length", "1000"])
    assert res["max_length"] == 64 and "note: --max-length 1000 is more than" in capsys.readouterr().err


def test_aggregate_tables_comparison_and_plot(tmp_path):
    runs = [{"de": {"f1": 60.0, "exact_match": 40.0}, "ar": {"f1": 50.0, "exact_match": 30.0}},
            {"de": {"f1": 64.0, "exact_match": 44.0}, "ar": {"f1": 52.0, "exact_match": 36.0}}]
    before = report.aggregate("xquad", runs, [1, 2], list(report.PAPER_SEEN_LANGUAGES), model="m")
    # the sample std (n - 1), as papers report it: 2 sqrt(2), where the population std gave 2
    assert before["languages"]["de"]["f1"] == {"mean": 62.0, "std": pytest.approx(8 ** 0.5), "per_seed": [60.0, 64.0]}
    assert before["averages"]["seen"] == {"f1": 62.0, "exact_match": 42.0}          # de only
    assert before["averages"]["all"] == {"f1": 56.5, "exact_match": 37.5}
    md = report.markdown_table(before)
    assert "| de | 62.00 ± 2.83 | 42.00 ± 2.83 |" in md and "| average (all) | 56.50 | 37.50 |" in md
    table = report.comparison_table({"ours": {"xquad": before}})
    assert "| WordOT (paper) | 75.4 | 74.7 / 59.0 |" in table and "| ours (ours) | - | 62.0 / 42.0 |" in table
    after = json.loads(json.dumps(before))
    after["languages"]["de"]["f1"]["mean"] = 70.0
    png = report.plot_before_after(before, after, "f1", tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metric 'accuracy'"):
        report.plot_before_after(before, after, "accuracy", tmp_path / "q.png")
    js, _ = report.write_result(tmp_path, "xquad", before)
    assert report.load_result(js)["averages"] == before["averages"]


def test_train_config_bad_input():
    from train.eval.finetune import TrainConfig

    base = {"learning_rate": 2e-5, "epochs": 1, "batch_size": 8}
    assert TrainConfig.from_dict(base).grad_accumulation == 1
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        TrainConfig.from_dict({**base, "learning_rate": "fast"})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_dict({**base, "batch_size": 0})
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({**base, "precision": "fp8"})


class _Regression(torch.nn.Module):
    """A linear model with the ``.loss`` output of a Hugging Face task head (no dropout: deterministic)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, inputs, labels):
        return types.SimpleNamespace(loss=((self.linear(inputs).squeeze(-1) - labels) ** 2).mean())


def test_finetune_updates_average_grad_accumulation_micro_batches_across_epochs_and_keep_the_best():
    """Against a loop written here from the docstring: 7 features in batches of 2 make 4 micro-batches an epoch,
    so with accumulation 3 and 2.5 epochs the 4 updates are micro-batches (1-3), (4, 1', 2'), ... in each
    epoch's shuffled order; the schedule decays linearly to 0 over them; the best-scoring update's parameters
    are the ones kept."""
    from train.eval.finetune import TrainConfig, finetune

    gen = torch.Generator().manual_seed(0)
    features = [{"inputs": torch.randn(3, generator=gen), "labels": torch.randn((), generator=gen)} for _ in range(7)]
    collate = lambda fs: {k: torch.stack([f[k] for f in fs]) for k in fs[0]}          # noqa: E731
    cfg = TrainConfig(learning_rate=0.1, epochs=2.5, batch_size=2, grad_accumulation=3, max_grad_norm=0.0,
                      eval_steps=1)
    torch.manual_seed(1)
    model, want = _Regression(), _Regression()
    want.load_state_dict(model.state_dict())

    states, scores = [], iter([0.1, 0.9, 0.3, 0.2])          # evaluated after updates 1, 2, 3 and at the end

    def evaluate():
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    result = finetune(model, features, collate, cfg, seed=5, evaluate=evaluate, log=lambda _: None)

    order = torch.Generator().manual_seed(5)
    micro = [collate([features[i] for i in perm[s:s + 2]])
             for perm in (torch.randperm(7, generator=order).tolist() for _ in range(3)) for s in range(0, 7, 2)]
    total = 4                                                 # ceil(4 micro-batches x 2.5 epochs / 3)
    opt = torch.optim.AdamW([{"params": [want.linear.weight], "weight_decay": 0.0},
                             {"params": [want.linear.bias], "weight_decay": 0.0}], lr=0.1, eps=1e-8)
    kept = []
    for update in range(total):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (total - update) / total
        for batch in micro[3 * update:3 * update + 3]:
            (want(**batch).loss / 3).backward()
        opt.step()
        opt.zero_grad()
        kept.append({k: v.clone() for k, v in want.state_dict().items()})
    assert result["updates"] == total and result["best_update"] == 2 and result["best_score"] == 0.9
    for got, expected in zip(states, kept):
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    for key, value in model.state_dict().items():            # the best update's parameters are kept
        torch.testing.assert_close(value, kept[1][key], rtol=0, atol=0)
