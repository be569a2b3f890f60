"""``python -m train.evaluate TASK ...``: zero-shot cross-lingual evaluation of (aligned) encoders.

Tasks:
    xnli             fine-tune a classifier on English NLI, select on English dev, test every language
    xquad            fine-tune a QA head on SQuAD v1.1 (English), test every XQuAD language (F1 / EM)
    score-squad      official SQuAD v1.1 scoring of a predictions file (JSON line, percent)
    retrieval        sentence retrieval accuracy over parallel pairs (mean-pooled layer, both directions)
    align            word alignments from OT plans between word embeddings, in Pharaoh format
    score-alignment  AER, precision and recall against gold ``i-j`` / ``ipj`` links (JSON line, fractions)
    report           the comparison table against the paper and the before/after bar plot from result JSONs

Every task that produces numbers prints them as one JSON line on stdout; with ``--output-dir`` it also
writes ``TASK.json`` and ``TASK.md`` there.
"""

from __future__ import annotations

import argparse
import json
import sys


def _score_squad(args: argparse.Namespace) -> dict:
    from train.eval import squad

    return squad.evaluate(squad.load_squad_file(args.gold), squad.load_predictions(args.predictions))


def _score_alignment(args: argparse.Namespace) -> dict:
    from train.eval import alignment as al

    gold = al.read_pharaoh(args.gold)
    pred = [links for links, _ in al.read_pharaoh(args.predictions, allow_possible=False)]
    return al.score_alignments(gold, pred)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every task (one sub-command each)."""
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)

    p = sub.add_parser("score-squad", help="official SQuAD v1.1 EM / F1 (percent)")
    p.add_argument("--gold", required=True, help="SQuAD v1.1 / XQuAD JSON file")
    p.add_argument("--predictions", required=True, help="JSON object: question id -> answer text")
    p.set_defaults(run=_score_squad)

    p = sub.add_parser("score-alignment", help="AER, precision, recall (fractions)")
    p.add_argument("--gold", required=True, help="Pharaoh file, 'i-j' sure and 'ipj' possible links")
    p.add_argument("--predictions", required=True, help="Pharaoh file, 'i-j' links")
    p.set_defaults(run=_score_alignment)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one task; print its result as a JSON line and return it."""
    args = build_parser().parse_args(argv)
    result = args.run(args)
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
