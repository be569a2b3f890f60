"""Word alignments from OT plans (otfast.alignment) and AER scoring (train.eval.alignment), by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import otfast
from train.eval import alignment as al

FIX = Path(__file__).parent / "fixtures" / "eval"
ROOT = Path(__file__).resolve().parents[1]

# Row argmax: 0->0, 1->0, 2->0 (tie at 0.10 goes to the lower index); column argmax: 0->0, 1->0.
PLAN = torch.tensor([[0.30, 0.20],
                     [0.25, 0.05],
                     [0.10, 0.10]], dtype=torch.float64)


@pytest.mark.parametrize("method, expected", [
    ("forward", [(0, 0), (1, 0), (2, 0)]),
    ("backward", [(0, 0), (0, 1)]),
    ("intersection", [(0, 0)]),
])
def test_argmax_methods_by_hand(method, expected):
    links = otfast.plan_alignments(PLAN, method=method)
    assert sorted(map(tuple, links.nonzero().tolist())) == expected


def test_threshold_by_hand():
    # rows a = (.5, .3, .2), columns b = (.65, .35); link iff P_ij >= 0.35 * max(a_i, b_j):
    # (0,0) .30 >= .2275, (0,1) .20 >= .175, (1,0) .25 >= .2275; (1,1) .05, (2,0) .10, (2,1) .10 fail.
    links = otfast.plan_alignments(PLAN, method="threshold", threshold=0.35)
    assert sorted(map(tuple, links.nonzero().tolist())) == [(0, 0), (0, 1), (1, 0)]


def test_padding_never_linked():
    plan = torch.zeros(2, 3, 2)
    plan[0] = PLAN.float()
    plan[1, :2, :1] = torch.tensor([[0.6], [0.4]])
    plan[1, :, 1] = 5.0                      # padding column with the largest values
    plan[1, 2, :] = 9.0                      # padding row
    mask_a = torch.tensor([[1, 1, 1], [1, 1, 0]])
    mask_b = torch.tensor([[1, 1], [1, 0]])
    links = otfast.alignment_links(otfast.plan_alignments(plan, mask_a, mask_b, method="intersection"))
    assert links == [[(0, 0)], [(0, 0)]]
    fwd = otfast.alignment_links(otfast.plan_alignments(plan, mask_a, mask_b, method="forward"))
    assert fwd[1] == [(0, 0), (1, 0)]


def test_word_alignments_recovers_a_permutation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    perm = [3, 0, 4, 1, 2]                    # y_j = x_perm[j]  =>  source i links to j with perm[j] = i
    y = torch.zeros(2, 6, 16, dtype=torch.float64)
    y[:, :5] = x[:, perm]
    y[:, 5] = torch.randn(16, generator=gen, dtype=torch.float64)
    mask_y = torch.tensor([[1] * 5 + [0], [1] * 5 + [0]])
    expected = sorted((perm[j], j) for j in range(5))
    for cost in ("cosine", "sqeuclidean"):
        eps = 0.05 if cost == "cosine" else 1.0
        out = otfast.word_alignments(x, y, None, mask_y, cost=cost, eps=eps)
        assert out == [expected, expected]


def test_plan_alignments_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        otfast.plan_alignments(PLAN, method="union")
    with pytest.raises(ValueError, match="threshold must be given"):
        otfast.plan_alignments(PLAN, method="threshold")
    with pytest.raises(ValueError, match="only used by"):
        otfast.plan_alignments(PLAN, threshold=0.5)
    with pytest.raises(ValueError, match="negative"):
        otfast.plan_alignments(-PLAN)
    with pytest.raises(ValueError, match="NaN"):
        otfast.plan_alignments(PLAN.clone().fill_(float("nan")))
    with pytest.raises(TypeError):
        otfast.plan_alignments(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cost"):
        otfast.word_alignments(torch.ones(1, 2, 3), torch.ones(1, 2, 3), cost="l1")


def test_parse_links():
    sure, possible = al.parse_links("0-0 1p2 3-1")
    assert sure == {(0, 0), (3, 1)} and possible == {(0, 0), (1, 2), (3, 1)}
    with pytest.raises(ValueError, match="not a link"):
        al.parse_links("0-0 1x2", where="g:1")
    with pytest.raises(ValueError, match="possible link"):
        al.parse_links("1p2", allow_possible=False)


def test_aer_by_hand():
    # |A| = 6, |S| = 7, |A & S| = 3, |A & P| = 5 (see the fixture files).
    gold = al.read_pharaoh(FIX / "align.gold")
    pred = [links for links, _ in al.read_pharaoh(FIX / "align.pred", allow_possible=False)]
    out = al.score_alignments(gold, pred)
    assert out["precision"] == pytest.approx(5 / 6)
    assert out["recall"] == pytest.approx(3 / 7)
    assert out["aer"] == pytest.approx(5 / 13)
    perfect = al.score_alignments(gold, [s for s, _ in gold])
    assert perfect["aer"] == 0.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    with pytest.raises(ValueError, match="3 sentence pairs"):
        al.score_alignments(gold, pred[:2])


def test_score_alignment_cli():
    proc = subprocess.run([sys.executable, "-m", "train.evaluate", "score-alignment", "--gold",
                           str(FIX / "align.gold"), "--predictions", str(FIX / "align.pred")],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["aer"] == pytest.approx(5 / 13) and out["precision"] == pytest.approx(5 / 6)


def test_pharaoh_round_trip_and_parallel(tmp_path):
    al.write_pharaoh(tmp_path / "a.txt", [[(2, 1), (0, 0)], []])
    assert (tmp_path / "a.txt").read_text() == "0-0 2-1\n\n"
    pairs = al.read_parallel(FIX / "align.xx", FIX / "align.en")
    assert pairs[1] == (["lu", "kato", "vemi"], ["the", "old", "cat"])
    (tmp_path / "fa.txt").write_text("a b ||| c\n")
    assert al.read_parallel(tmp_path / "fa.txt") == [(["a", "b"], ["c"])]
    al.check_links_in_range(al.read_pharaoh(FIX / "align.gold"), pairs, "gold")
    with pytest.raises(ValueError, match="out of range"):
        al.check_links_in_range([({(5, 0)}, {(5, 0)})] * 3, pairs, "gold")


def test_parallel_lines_end_at_lf_only(tmp_path):
    """U+2028, U+0085 or a lone CR inside a sentence used to split it in two (str.splitlines), shifting every
    later pair; CR LF line ends still read as line ends."""
    (tmp_path / "s.txt").write_bytes("a\u2028b c\r\nd\x85e\nf\rg\n".encode())
    (tmp_path / "t.txt").write_bytes(b"A B\r\nC\nD\n")
    assert al.read_parallel(tmp_path / "s.txt", tmp_path / "t.txt") == [
        (["a", "b", "c"], ["A", "B"]), (["d", "e"], ["C"]), (["f", "g"], ["D"])]
    (tmp_path / "fa.txt").write_bytes("x\u2028y ||| z\r\n".encode())
    assert al.read_parallel(tmp_path / "fa.txt") == [(["x", "y"], ["z"])]


def test_parallel_text_is_read_as_the_training_data_is(tmp_path):
    """The harness's one line reader (``train.text.text_lines``): a byte-order mark is not part of the first
    word (it was, where the training data's reader dropped it), and a line that is not UTF-8 is named."""
    (tmp_path / "s.txt").write_bytes(b"\xef\xbb\xbfa b\nc\n")
    (tmp_path / "t.txt").write_bytes(b"A\n\xff B\n")
    with pytest.raises(ValueError, match=r"t.txt:2 is not valid UTF-8"):
        al.read_parallel(tmp_path / "s.txt", tmp_path / "t.txt")
    (tmp_path / "t.txt").write_bytes(b"A\nB\n")
    assert al.read_parallel(tmp_path / "s.txt", tmp_path / "t.txt") == [(["a", "b"], ["A"]), (["c"], ["B"])]


def test_gold_is_read_as_the_parallel_text_is(tmp_path):
    """A gold file with a byte-order mark (as Windows tools write it) was refused ("'\\ufeff0-0' is not a link")
    after the whole alignment had run, where the parallel text beside it reads; a line not UTF-8 is named."""
    (tmp_path / "g.txt").write_bytes("\ufeff0-0 1p1\r\n1-0\r\n".encode())
    (tmp_path / "p.txt").write_text("0-0 1-1 0-1\n1-0\n")
    gold = al.read_pharaoh(tmp_path / "g.txt")
    assert gold == [({(0, 0)}, {(0, 0), (1, 1)}), ({(1, 0)}, {(1, 0)})]
    # |A| = 4, |S| = 2, |A & S| = 2, |A & P| = 3
    out = al.score_alignments(gold, [s for s, _ in al.read_pharaoh(tmp_path / "p.txt", allow_possible=False)])
    assert (out["precision"], out["recall"], out["aer"]) == pytest.approx((3 / 4, 1.0, 1 - 5 / 6))
    (tmp_path / "g.txt").write_bytes(b"0-0\n\xff1-0\n")
    with pytest.raises(ValueError, match=r"g.txt:2 is not valid UTF-8"):
        al.read_pharaoh(tmp_path / "g.txt")
