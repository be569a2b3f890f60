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
per-language numbers also write ``TASK.json`` and ``TASK.md`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def load_config(path: str, overrides: list[str]) -> dict:
    """A task config (``yaml.safe_load``) with ``key=value`` overrides.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings; values are parsed as YAML (``1e-4`` as a float), dotted keys reach
            into sections (``data.train=path``).

    Returns:
        The config dict.
    """
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _yaml_value(value)
    return cfg


def _yaml_value(text: str):
    """A YAML scalar or list; numbers YAML 1.1 reads as strings (``1e-4``) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _finish(args: argparse.Namespace, name: str, result: dict) -> dict:
    if getattr(args, "output_dir", None):
        from train.eval.report import write_result

        write_result(args.output_dir, name, result)
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _xnli(args: argparse.Namespace) -> dict:
    from train.eval import xnli

    cfg = load_config(args.config, args.set)
    return _finish(args, "xnli", xnli.run(cfg, args.model, args.output_dir, log=_log))


def _xquad(args: argparse.Namespace) -> dict:
    from train.eval import xquad

    cfg = load_config(args.config, args.set)
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


def _retrieval(args: argparse.Namespace) -> dict:
    from train.eval.report import aggregate
    from train.modeling import load_encoder
    from train.retrieval import evaluate_retrieval

    pairs = _parallel(args)
    model, tokenizer = load_encoder(args.model)
    acc = evaluate_retrieval(model, tokenizer, [" ".join(s) for s, _ in pairs], [" ".join(t) for _, t in pairs],
                             layer=args.layer, batch_size=args.batch_size, max_length=args.max_length)
    result = aggregate("retrieval", [{args.language: acc}], None, [args.language], model=str(args.model),
                       n_pairs=len(pairs), layer=args.layer)
    return _finish(args, "retrieval", result)


def _align(args: argparse.Namespace) -> dict:
    import torch

    import otfast
    from train.eval import alignment as al
    from train.modeling import encode_words, layer_states, load_encoder, word_embeddings

    pairs = _parallel(args)
    model, tokenizer = load_encoder(args.model)
    model.eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    links: list[list[tuple[int, int]]] = []
    with torch.no_grad():
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            side = []
            for words in ([s for s, _ in chunk], [t for _, t in chunk]):
                batch = {k: v.to(device) for k, v in encode_words(tokenizer, words, args.max_length).items()}
                side.append(word_embeddings(layer_states(model, batch, args.layer), batch["word_ids"], args.word_mode))
            (x, mx), (y, my) = side
            links += otfast.word_alignments(x.float(), y.float(), mx, my, cost=args.cost, eps=args.eps,
                                            method=args.method, threshold=args.threshold)
    result = {"task": "align", "model": str(args.model), "n_pairs": len(pairs),
              "n_links": sum(map(len, links)), "method": args.method, "cost": args.cost, "eps": args.eps}
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
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)

    for name, fn, default_cfg in (("xnli", _xnli, "train/configs/eval_xnli.yaml"),
                                  ("xquad", _xquad, "train/configs/eval_xquad.yaml")):
        p = sub.add_parser(name, help=f"{name} zero-shot transfer (fine-tune on English, test every language)")
        p.add_argument("--model", required=True, help="hub name or folder of the encoder (before or after alignment)")
        p.add_argument("--config", default=default_cfg, help=f"task config (default {default_cfg})")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--output-dir", help="writes NAME.json, NAME.md and predictions/SEED/LANG.*")
        p.set_defaults(handler=fn)

    p = sub.add_parser("score-squad", help="official SQuAD v1.1 EM / F1 (percent)")
    p.add_argument("--gold", required=True, help="SQuAD v1.1 / XQuAD JSON file")
    p.add_argument("--predictions", required=True, help="JSON object: question id -> answer text")
    p.set_defaults(handler=_score_squad)

    p = sub.add_parser("score-alignment", help="AER, precision, recall (fractions)")
    p.add_argument("--gold", required=True, help="Pharaoh file, 'i-j' sure and 'ipj' possible links")
    p.add_argument("--predictions", required=True, help="Pharaoh file, 'i-j' links")
    p.set_defaults(handler=_score_alignment)

    for name, fn, help_ in (("retrieval", _retrieval, "sentence retrieval accuracy, both directions"),
                            ("align", _align, "word alignments from OT plans, Pharaoh output")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="hub name or folder of the encoder")
        p.add_argument("--source", help="source sentences, one per line (words split by spaces), or "
                                        "'src ||| tgt' lines without --target")
        p.add_argument("--target", help="target sentences, line-aligned with --source")
        p.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N held-out synthetic pairs")
        p.add_argument("--synthetic-seed", type=int, default=12345, help="sampler seed of --synthetic")
        p.add_argument("--layer", type=int, default=-1, help="hidden_states index (0 = embeddings, -1 = last)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--max-length", type=int, default=128, help="tokens per sentence")
        p.add_argument("--output-dir", help="writes NAME.json and NAME.md")
        if name == "retrieval":
            p.add_argument("--language", default="xx", help="label of the source language in the tables")
        else:
            p.add_argument("--output", help="Pharaoh file to write (one line per pair, 0-based i-j)")
            p.add_argument("--gold", help="gold Pharaoh file: also print AER, precision, recall")
            p.add_argument("--word-mode", default="last", choices=("last", "first", "mean"),
                           help="word = its last sub-word (the paper's WordOT), first, or mean")
            p.add_argument("--method", default="intersection",
                           choices=("forward", "backward", "intersection", "threshold"))
            p.add_argument("--threshold", type=float, default=None, help="for --method threshold, in (0, 1]")
            p.add_argument("--cost", default="cosine", choices=("cosine", "sqeuclidean"))
            p.add_argument("--eps", type=float, default=0.05, help="entropic temperature of the plan")
        p.set_defaults(handler=fn)

    p = sub.add_parser("report", help="comparison with the paper and before/after plots")
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RESULT.json",
                   help="a result file of xnli / xquad / retrieval, under a system label (repeatable)")
    p.add_argument("--before", help="label of the model before alignment (for the plots)")
    p.add_argument("--after", help="label of the model after alignment")
    p.add_argument("--output-dir", required=True)
    p.set_defaults(handler=_report)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one task; print its result as a JSON line and return it."""
    args = build_parser().parse_args(argv)
    result = args.handler(args)
    printable = {k: v for k, v in result.items() if k not in ("config", "train_runs")}
    print(json.dumps(printable, sort_keys=True))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
