"""``python -m train.evaluate TASK ...``: zero-shot cross-lingual evaluation of (aligned) encoders.

Tasks:
    xnli             fine-tune a classifier on English NLI, select on English dev, test every language
    xquad            fine-tune a QA head on SQuAD v1.1 (English), test every XQuAD language (F1 / EM)
    score-squad      official SQuAD v1.1 scoring of a predictions file (JSON line, percent)
    retrieval        sentence retrieval accuracy over parallel pairs (mean-pooled layer, both directions)
    align            word alignments from OT plans between word embeddings, in Pharaoh format
    score-alignment  AER, precision and recall against gold ``i-j`` / ``ipj`` links (JSON line, fractions)
    report           the comparison table against the paper and before/after bar plots from result JSONs

Every task prints its numbers as one JSON line on stdout; with ``--output-dir`` the tasks that produce
per-language numbers also write ``TASK.json`` and ``TASK.md`` there. ``xnli`` and ``xquad`` take config
overrides as ``train.align`` does: ``--seeds [1] --data.test XNLI-1.0/xnli.test.tsv`` (``train.config``).
Bad input is one ``error:`` line (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from train.config import TASK_DEFAULTS, HelpFormatter, load_task_config

FINETUNE_TASKS = ("xnli", "xquad")
MODEL_TASKS = (*FINETUNE_TASKS, "retrieval", "align")


def _legacy_set(items: list[str]) -> list[str]:
    """``--set key=value`` (the old override syntax) as ``--key=value``, with a DeprecationWarning."""
    if items:
        warnings.warn("--set KEY=VALUE is deprecated: write --KEY VALUE (e.g. --seeds [1] --data.test FILE)",
                      DeprecationWarning, stacklevel=2)
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE (better: --KEY VALUE)")
    return [f"--{item}" for item in items]


def _finish(args: argparse.Namespace, name: str, result: dict) -> dict:
    if getattr(args, "output_dir", None):
        from train.eval.report import write_result

        write_result(args.output_dir, name, result)
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _xnli(args: argparse.Namespace) -> dict:
    from train.eval import xnli

    cfg = load_task_config("xnli", args.config, args.overrides)
    return _finish(args, "xnli", xnli.run(cfg, args.model, args.output_dir, log=_log))


def _xquad(args: argparse.Namespace) -> dict:
    from train.eval import xquad

    cfg = load_task_config("xquad", args.config, args.overrides)
    return _finish(args, "xquad", xquad.run(cfg, args.model, args.output_dir, log=_log))


def _score_squad(args: argparse.Namespace) -> dict:
    from train.eval import squad

    return squad.evaluate(squad.load_squad_file(args.gold), squad.load_predictions(args.predictions))


def _score_alignment(args: argparse.Namespace) -> dict:
    from train.eval import alignment as al

    gold = al.read_pharaoh(args.gold)
    pred = [links for links, _ in al.read_pharaoh(args.predictions, allow_possible=False)]
    return al.score_alignments(gold, pred)


def _parallel(args: argparse.Namespace) -> list[tuple[list[str], list[str]]]:
    from train.eval import alignment as al

    if args.synthetic:
        from train.synthetic import synthetic_pairs

        ds = synthetic_pairs(args.synthetic, seed=args.synthetic_seed)
        return [(s.split(), t.split()) for s, t in zip(ds["source"], ds["target"])]
    if not args.source:
        raise ValueError("give --source (and --target, or a 'src ||| tgt' file) or --synthetic N")
    return al.read_parallel(args.source, args.target)


DEFAULT_MAX_LENGTH = 128


def _max_length(args: argparse.Namespace, model, tokenizer) -> int:
    """``--max-length``, at most what the model takes (a longer input fails inside it): by default 128 or the
    model's limit if lower, and a larger value given is cut to that limit with a note."""
    from train.modeling import position_limit

    limit = position_limit(model, tokenizer)
    if args.max_length is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    if limit is not None and args.max_length > limit:
        _log(f"note: --max-length {args.max_length} is more than {args.model} takes ({limit} tokens): using {limit}")
        return limit
    return args.max_length


def _retrieval(args: argparse.Namespace) -> dict:
    from train.eval.report import aggregate
    from train.modeling import load_encoder
    from train.retrieval import evaluate_retrieval

    pairs = _parallel(args)
    model, tokenizer = load_encoder(args.model)
    max_length = _max_length(args, model, tokenizer)
    acc = evaluate_retrieval(model, tokenizer, [" ".join(s) for s, _ in pairs], [" ".join(t) for _, t in pairs],
                             layer=args.layer, batch_size=args.batch_size, max_length=max_length)
    result = aggregate("retrieval", [{args.language: acc}], None, [args.language], model=str(args.model),
                       n_pairs=len(pairs), layer=args.layer, max_length=max_length)
    return _finish(args, "retrieval", result)


def _align(args: argparse.Namespace) -> dict:
    import torch

    import otfast
    from train.eval import alignment as al
    from train.modeling import encode_words, layer_states, load_encoder, word_embeddings

    pairs = _parallel(args)
    model, tokenizer = load_encoder(args.model)
    model.eval()
    max_length = _max_length(args, model, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    links: list[list[tuple[int, int]]] = []
    unconverged = 0
    cut = torch.zeros(len(pairs), dtype=torch.bool)            # pairs with a side cut to max_length
    words_cut = 0
    with torch.no_grad():
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            side = []
            for name, words in (("source", [s for s, _ in chunk]), ("target", [t for _, t in chunk])):
                batch = encode_words(tokenizer, words, max_length)
                left_out = torch.tensor([len(w) for w in words]) - batch.pop("n_words")
                cut[start:start + len(chunk)] |= left_out > 0
                words_cut += int(left_out.sum())
                batch = {k: v.to(device) for k, v in batch.items()}
                side.append(word_embeddings(layer_states(model, batch, args.layer), batch["word_ids"], args.word_mode))
                empty = (~side[-1][1].any(1)).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"pair {start + empty[0] + 1}: no word of its {name} sentence has a sub-word "
                                     f"token within --max-length {max_length} (the tokenizer strips every word, or the "
                                     "first word alone is longer)")
            (x, mx), (y, my) = side
            with warnings.catch_warnings(record=True) as caught:    # said once below, in terms of our options
                warnings.simplefilter("always", RuntimeWarning)
                # float64: in float32 the marginal error of many pairs stalls near 1e-6
                links += otfast.word_alignments(x.double(), y.double(), mx, my, cost=args.cost, eps=args.eps,
                                                n_iters=args.n_iters, tol=args.tol, method=args.method,
                                                threshold=args.threshold)
            unconverged += any(issubclass(w.category, RuntimeWarning) for w in caught)
    if unconverged:
        _log(f"align: in {unconverged} of {-(-len(pairs) // args.batch_size)} batches some pairs did not reach "
             f"--tol {args.tol} within --n-iters {args.n_iters}; their links come from a plan that is not fully "
             "converged: raise --n-iters (or --tol) if that matters")
    if words_cut:
        _log(f"align: {int(cut.sum())} of {len(pairs)} pairs have a sentence longer than --max-length {max_length} "
             f"tokens, cut at a word boundary: their last {words_cut} words in all are never linked (a gold link to "
             "one counts as missed); raise --max-length (up to what the model takes) to align them")
    result = {"task": "align", "model": str(args.model), "n_pairs": len(pairs),
              "n_links": sum(map(len, links)), "method": args.method, "cost": args.cost, "eps": args.eps,
              "n_iters": args.n_iters, "tol": args.tol, "unconverged_batches": unconverged,
              "max_length": max_length, "truncated_pairs": int(cut.sum()), "truncated_words": words_cut}
    if args.output:
        al.write_pharaoh(args.output, links)
        result["output"] = str(args.output)
    if args.gold:
        gold = al.read_pharaoh(args.gold)
        al.check_links_in_range(gold, pairs, str(args.gold))
        result.update(al.score_alignments(gold, [set(x) for x in links]))
    return _finish(args, "align", result)


def _report(args: argparse.Namespace) -> dict:
    from train.eval import report

    runs: dict[str, dict] = {}
    for item in args.run:
        if "=" not in item:
            raise ValueError(f"--run {item!r} must look like LABEL=RESULT.json")
        label, path = item.split("=", 1)
        result = report.load_result(path)
        runs.setdefault(label, {})[result["task"]] = result
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(report.comparison_table(runs))
    written = [str(out / "comparison.md")]
    if args.before and args.after:
        for label in (args.before, args.after):
            if label not in runs:
                raise ValueError(f"no --run labelled {label!r} (have {', '.join(runs)})")
        for task, before in runs[args.before].items():
            after = runs[args.after].get(task)
            if after is None:
                continue
            for metric in before["metrics"]:
                path = out / f"{task}_{metric}.png"
                report.plot_before_after(before, after, metric, path, labels=(args.before, args.after))
                written.append(str(path))
    return {"task": "report", "written": written}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every task (one sub-command each)."""
    fmt = HelpFormatter
    parser = argparse.ArgumentParser(prog="./dev python -m train.evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=fmt, allow_abbrev=False)
    sub = parser.add_subparsers(dest="task", required=True)

    for name in FINETUNE_TASKS:
        p = sub.add_parser(name, help=f"{name} zero-shot transfer (fine-tune on English, test every language)",
                           formatter_class=fmt, allow_abbrev=False,
                           epilog="Any other '--KEY VALUE' pair overrides the config, e.g. --seeds [1] "
                                  "--data.test XNLI-1.0/xnli.test.tsv (keys: those of the default config).")
        p.add_argument("--model", required=True, help="hub name or folder of the encoder (before or after alignment)")
        p.add_argument("--config", default=str(TASK_DEFAULTS[name]),
                       help="task config; its keys override the default config's")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="deprecated: override a config key (write --KEY VALUE instead)")
        p.add_argument("--output-dir", help="writes NAME.json, NAME.md and predictions/SEED/LANG.*")
        p.set_defaults(handler=_xnli if name == "xnli" else _xquad)

    p = sub.add_parser("score-squad", help="official SQuAD v1.1 EM / F1 (percent)", formatter_class=fmt)
    p.add_argument("--gold", required=True, help="SQuAD v1.1 / XQuAD JSON file")
    p.add_argument("--predictions", required=True, help="JSON object: question id -> answer text")
    p.set_defaults(handler=_score_squad)

    p = sub.add_parser("score-alignment", help="AER, precision, recall (fractions)", formatter_class=fmt)
    p.add_argument("--gold", required=True, help="Pharaoh file, 'i-j' sure and 'ipj' possible links")
    p.add_argument("--predictions", required=True, help="Pharaoh file, 'i-j' links")
    p.set_defaults(handler=_score_alignment)

    for name, fn, help_ in (("retrieval", _retrieval, "sentence retrieval accuracy, both directions"),
                            ("align", _align, "word alignments from OT plans, Pharaoh output")):
        p = sub.add_parser(name, help=help_, formatter_class=fmt)
        p.add_argument("--model", required=True, help="hub name or folder of the encoder")
        p.add_argument("--source", help="source sentences, one per line (words split by spaces), or "
                                        "'src ||| tgt' lines without --target")
        p.add_argument("--target", help="target sentences, line-aligned with --source")
        p.add_argument("--synthetic", type=int, default=0, metavar="N",
                       help="use N held-out synthetic pairs instead of --source / --target (0: off)")
        p.add_argument("--synthetic-seed", type=int, default=12345, help="sampler seed of --synthetic")
        p.add_argument("--layer", type=int, default=-1, help="hidden_states index (0 = embeddings, -1 = last)")
        p.add_argument("--batch-size", type=int, default=64, help="sentence pairs per forward pass")
        p.add_argument("--max-length", type=int, default=None,
                       help=f"tokens per sentence, special tokens included (default: {DEFAULT_MAX_LENGTH}, or the "
                            "model's limit if lower; a larger value is cut to that limit)")
        p.add_argument("--output-dir", help="writes NAME.json and NAME.md")
        if name == "retrieval":
            p.add_argument("--language", default="xx", help="label of the source language in the tables")
        else:
            p.add_argument("--output", help="Pharaoh file to write (one line per pair, 0-based i-j)")
            p.add_argument("--gold", help="gold Pharaoh file: also print AER, precision, recall")
            p.add_argument("--word-mode", default="last", choices=("last", "first", "mean"),
                           help="word = its last sub-word (the paper's WordOT), first, or mean")
            p.add_argument("--method", default="intersection",
                           choices=("forward", "backward", "intersection", "threshold"),
                           help="links from the plan: argmax per source word (forward), per target word "
                                "(backward), both (intersection), or entries above --threshold")
            p.add_argument("--threshold", type=float, default=None,
                           help="for --method threshold: link i-j when P_ij reaches this share (0, 1] of both "
                                "the row and the column mass of the plan")
            p.add_argument("--cost", default="cosine", choices=("cosine", "sqeuclidean"),
                           help="ground cost between word vectors")
            p.add_argument("--eps", type=float, default=0.05, help="entropic temperature of the plan")
            p.add_argument("--n-iters", type=int, default=20000, help="most Sinkhorn iterations per batch")
            p.add_argument("--tol", type=float, default=1e-4, help="stop once the marginal error is below this")
        p.set_defaults(handler=fn)

    p = sub.add_parser("report", help="comparison with the paper and before/after plots", formatter_class=fmt)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RESULT.json",
                   help="a result file of xnli / xquad / retrieval, under a system label (repeatable)")
    p.add_argument("--before", help="label of the model before alignment (for the plots)")
    p.add_argument("--after", help="label of the model after alignment")
    p.add_argument("--output-dir", required=True, help="where comparison.md and the plots go")
    p.set_defaults(handler=_report)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one task; print its result as a JSON line and return it.

    Raises:
        ValueError, OSError: bad input (``cli`` prints them as one line).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.task in MODEL_TASKS:
        import transformers

        transformers.utils.logging.disable_progress_bar()        # no "Loading weights" bar per model
    if args.task in FINETUNE_TASKS:
        args.overrides = extra + _legacy_set(args.set)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    result = args.handler(args)
    printable = {k: v for k, v in result.items() if k not in ("config", "train_runs")}
    print(json.dumps(printable, sort_keys=True))
    return result


def cli(argv: list[str] | None = None) -> int:
    """``main`` with bad input as one ``error:`` line (status 2) and Ctrl-C as one line (130)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:                 # bad input; a bug (TypeError, ...) keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
