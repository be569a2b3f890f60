"""One config loader and one override syntax for train.align and train.evaluate; the command lines' help
and their one-line errors."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import get_args

import pytest

import train.evaluate as evaluate
from train import align
from train.config import (DEFAULTS, TASK_DEFAULTS, TASK_TYPES, TYPES, load_config, load_task_config, parse_overrides,
                          read_yaml)

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def test_overrides_in_both_spellings():
    assert parse_overrides(["--train.lr", "1e-4", "--loss.granularity=batch", "--train.max-steps", "null",
                            "--seeds", "[1, 2]", "--data.test", "x.{lang}.tsv"]) == [
        (["train", "lr"], 1e-4), (["loss", "granularity"], "batch"), (["train", "max_steps"], None),
        (["seeds"], [1, 2]), (["data", "test"], "x.{lang}.tsv")]
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--train.lr", "--loss.blur", "1"])
    with pytest.raises(ValueError, match="look like --train.lr"):
        parse_overrides(["train.lr", "1"])


def test_no_and_off_stay_strings_and_booleans_are_true_or_false(tmp_path):
    """YAML 1.2 booleans: ``mixed_precision: no`` is accelerate's "no", not False (YAML 1.1 read it as False)."""
    tiny = CONFIGS / "tiny.yaml"
    assert load_config(tiny, ["--train.mixed_precision", "no"])["train"]["mixed_precision"] == "no"
    (tmp_path / "run.yaml").write_text("train:\n  mixed_precision: no\n  cpu: false\n  resume: off\n")
    assert read_yaml(tmp_path / "run.yaml")["train"] == {"mixed_precision": "no", "cpu": False, "resume": "off"}
    with pytest.raises(ValueError, match="train.cpu must be true or false, got 'yes'"):
        load_config(tiny, ["--train.cpu", "yes"])


def test_config_files_fail_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"config file .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "code.yaml").write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match="not valid YAML"):            # safe_load: a config never runs code
        read_yaml(tmp_path / "code.yaml")


def test_task_config_overrides_are_typed_and_checked_against_the_defaults():
    cfg = load_task_config("xnli", CONFIGS / "eval_xnli.yaml",
                           ["--seeds", "[7]", "--data.train", "/x/train.tsv", "--learning_rate", "1e-4"])
    assert cfg["seeds"] == [7] and cfg["data"]["train"] == "/x/train.tsv" and math.isclose(cfg["learning_rate"], 1e-4)
    assert cfg["batch_size"] * cfg["grad_accumulation"] == 32 and cfg["epochs"] == 5   # XTREME mBERT defaults
    tiny = load_task_config("xquad", CONFIGS / "eval_xquad_tiny.yaml", ["--epochs", "2"])
    assert tiny["epochs"] == 2.0 and tiny["doc_stride"] == 24 and tiny["max_steps"] == 0
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'"):
        load_task_config("xnli", None, ["--learning_rat", "1e-4"])
    with pytest.raises(ValueError, match="unknown config key 'data.tset'"):
        load_task_config("xnli", None, ["--data.tset", "x.tsv"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        load_task_config("xnli", None, ["--batch_size", "eight"])


def _captured_xnli_config(monkeypatch, argv):
    seen = {}

    def run(cfg, model, out_dir, log):
        seen.update(cfg)
        return {"task": "xnli"}

    monkeypatch.setattr("train.eval.xnli.run", run)
    evaluate.main(["xnli", "--model", "m", *argv])
    return seen


def test_evaluate_takes_overrides_as_align_does_and_the_old_set_with_a_warning(monkeypatch):
    new = _captured_xnli_config(monkeypatch, ["--seeds", "[1]", "--data.test=/d/xnli.test.tsv"])
    assert new["seeds"] == [1] and new["data"]["test"] == "/d/xnli.test.tsv"
    with pytest.warns(DeprecationWarning, match="--set KEY=VALUE is deprecated"):
        old = _captured_xnli_config(monkeypatch, ["--set", "seeds=[1]", "--set", "data.test=/d/xnli.test.tsv"])
    assert old == new
    with pytest.raises(SystemExit):                                # tasks without a config refuse extra flags
        evaluate.main(["score-squad", "--gold", "g", "--predictions", "p", "--seeds", "[1]"])


def test_every_option_has_help_and_the_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        align.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--config CONFIG" in text and "(default: None)" not in text      # no default to show there
    parser = evaluate.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings}"
        assert issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = " ".join(subs.choices["align"].format_help().split())
    assert "most Sinkhorn iterations per batch (default: 20000)" in text and "(default: None)" not in text


def test_command_lines_turn_bad_input_into_one_line(tmp_path, capsys):
    assert align.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config file {tmp_path / 'nope.yaml'} not found\n"
    assert align.main(["--config", str(CONFIGS / "tiny.yaml"), "--train.lrr", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'train.lrr'")
    assert evaluate.cli(["xnli", "--model", "m", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path / 'nope.yaml'} not found\n"
    assert evaluate.cli(["retrieval", "--model", str(tmp_path / "no" / "such" / "model"), "--synthetic", "4"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: model folder {tmp_path / 'no' / 'such' / 'model'} not found\n"


@pytest.mark.parametrize("config, override, error", [
    ("paper_wordot.yaml", ["--train.max_steps", "abc"], "config train.max_steps must be int, got 'abc'"),
    ("tiny.yaml", ["--model.tiny.word_embedding_std", "wide"], "config model.tiny.word_embedding_std must be float"),
    ("tiny.yaml", ["--data.languages", "xx"], "config data.languages must be a list, got 'xx'"),
    ("tiny.yaml", ["--data.languages", "[xx]"], "config data.languages[0] must be a mapping, got 'xx'"),
    ("tiny.yaml", ["--train.adam_betas", "0.9"], "config train.adam_betas must be a list, got 0.9"),
    ("tiny.yaml", ["--train.adam_betas", "[0.9]"], "config train.adam_betas must be two numbers in [0, 1), got [0.9]"),
    ("tiny.yaml", ["--train.batch_size", "0"], "config train.batch_size must be >= 1, got 0"),
    ("tiny.yaml", ["--train.log_every", "0"], "config train.log_every must be >= 1, got 0"),
    ("tiny.yaml", ["--train.grad_accum", "-1"], "config train.grad_accum must be >= 1, got -1"),
    ("tiny.yaml", ["--train.lr", "true"], "config train.lr must be float, got True"),
    ("tiny.yaml", ["--train.batch_size", "true"], "config train.batch_size must be int, got True"),
    ("tiny.yaml", ["--train.lr", "nan"], "config train.lr must be a finite number, got 'nan'"),
    ("tiny.yaml", ["--train.batch_size", "null"], "config train.batch_size cannot be null"),
    ("tiny.yaml", ["--output_dir", "5"], "config output_dir must be a string, got 5"),
])
def test_wrong_types_and_values_out_of_range_are_one_error_line(capsys, config, override, error):
    assert align.main(["--config", str(CONFIGS / config), *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1


def test_keys_whose_default_is_none_or_empty_have_a_type_and_keep_null(capsys):
    """Every key whose default shows no type has one in TYPES (or TASK_TYPES); null stays allowed there."""
    def untyped(defaults, prefix=""):
        for key, value in defaults.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from untyped(value, f"{path}.")
            elif value is None or value == []:
                yield path, value

    for defaults, types in [(DEFAULTS, TYPES)] + [(read_yaml(path), TASK_TYPES) for path in TASK_DEFAULTS.values()]:
        for path, value in untyped(defaults):
            assert path in types and (value == [] or type(None) in get_args(types[path])), path
    cfg = load_config(CONFIGS / "paper_wordot.yaml", ["--train.max_steps", "12", "--train.num_threads", "null",
                                                      "--train.adam_betas", "[0.8, 0.9]"])
    assert cfg["train"]["max_steps"] == 12 and cfg["train"]["num_threads"] is None
    assert cfg["train"]["adam_betas"] == [0.8, 0.9]
    assert load_task_config("xnli", None, ["--max_train_examples", "8", "--device", "cpu"])["max_train_examples"] == 8
    with pytest.raises(ValueError, match="config seeds must be a list, got 1"):
        load_task_config("xnli", None, ["--seeds", "1"])
    with pytest.raises(ValueError, match="config max_train_examples must be int, got 'x'"):
        load_task_config("xnli", None, ["--max_train_examples", "x"])
    assert evaluate.cli(["xnli", "--model", "m", "--batch_size", "0"]) == 2
    assert "config batch_size must be >= 1, got 0" in capsys.readouterr().err
