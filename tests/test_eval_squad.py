"""Official SQuAD v1.1 scoring against hand-computed values (tests/fixtures/eval/squad_*.json)."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train.eval import squad

FIX = Path(__file__).parent / "fixtures" / "eval"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple, a day ", "apple day"),
    ("Theatre and thematic", "theatre and thematic"),   # articles only as whole words
    ("Eiffel's", "eiffels"),
    ("A", ""),
])
def test_normalize_answer(text, expected):
    assert squad.normalize_answer(text) == expected


def test_f1_and_exact_match_by_hand():
    assert squad.f1_score("1889", "in 1889") == pytest.approx(2 / 3)
    # pred "company of gustave eiffel" vs "gustave eiffel": p = 2/4, r = 1 -> 2/3
    assert squad.f1_score("the company of Gustave Eiffel", "Gustave Eiffel") == pytest.approx(2 / 3)
    assert squad.f1_score("", "anything") == 0.0
    assert squad.f1_score("a the", "an") == 0.0          # both normalise to nothing: official F1 is 0
    assert squad.exact_match_score("An apple", "apple") == 1.0
    assert squad.exact_match_score("1889", "in 1889") == 0.0


def test_fixture_scores_by_hand():
    # q1 EM 1 F1 1; q2 EM 0 F1 2/3; q3 EM 0 F1 max(2/3, 1/2); q4 unanswered 0; q5 EM 1 F1 1.
    data = squad.load_squad_file(FIX / "squad_dev.json")
    preds = squad.load_predictions(FIX / "squad_pred.json")
    warn = io.StringIO()
    out = squad.evaluate(data, preds, warn=warn)
    assert out["exact_match"] == pytest.approx(100 * 2 / 5)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 0 + 1) / 5)
    assert "Unanswered question q4 will receive score 0." in warn.getvalue()


def test_cli_prints_json_line():
    proc = subprocess.run([sys.executable, "-m", "train.evaluate", "score-squad", "--gold",
                           str(FIX / "squad_dev.json"), "--predictions", str(FIX / "squad_pred.json")],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    line = proc.stdout.strip().splitlines()[-1]
    out = json.loads(line)
    assert math.isclose(out["exact_match"], 40.0) and math.isclose(out["f1"], 100 * 2 / 3)


def test_bad_input(tmp_path):
    data = squad.load_squad_file(FIX / "squad_dev.json")
    with pytest.raises(ValueError, match=r"^predictions: the prediction for question 'q1' is 3 \(int\), not an answer "
                                         r"string$"):
        squad.evaluate(data, {"q1": 3})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(ValueError, match="not a SQuAD file"):
        squad.load_squad_file(bad)
    empty = [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "?", "answers": []}]}]}]
    with pytest.raises(ValueError, match="no gold answer"):
        squad.evaluate(empty, {"x": "c"})


def test_a_prediction_that_is_not_a_string_is_one_error_line_naming_the_question(tmp_path, capsys):
    """score-squad with {"q1": 5} used to end in a TypeError traceback."""
    from train.evaluate import cli

    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"q2": "in 1889", "q1": 5}))
    assert cli(["score-squad", "--gold", str(FIX / "squad_dev.json"), "--predictions", str(pred)]) == 2
    assert capsys.readouterr().err == (f"error: {pred}: the prediction for question 'q1' is 5 (int), not an answer "
                                       "string\n")
    pred.write_text("[]")
    assert cli(["score-squad", "--gold", str(FIX / "squad_dev.json"), "--predictions", str(pred)]) == 2
    assert capsys.readouterr().err == f"error: {pred} must map question ids to answer strings, got list\n"
