"""Result files: per-run JSON and markdown tables, the comparison with the paper, before/after bar plots.

A run's result is a dict::

    {"task": "xnli", "model": "...", "metrics": ["accuracy"], "seeds": [1, 2, 3],
     "languages": {"de": {"accuracy": {"mean": 70.1, "std": 0.4, "per_seed": [...]}}, ...},
     "averages": {"seen": {"accuracy": ...}, "all": {"accuracy": ...}},
     "seen_languages": ["bg", "de", ...]}     # the seen languages this run actually has

Averages are over languages of the per-language means; "seen" uses the languages the alignment was
trained on (bg, de, el, es, fr) that the task has (XQuAD has no bg or fr).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# Alqahtani et al. (2021), Table 1: averages over the seen languages.
PAPER = {
    "mBERT (their run)": {"xnli": {"accuracy": 73.5}, "xquad": {"f1": 73.4, "exact_match": 57.8}},
    "L2 alignment (Cao et al.)": {"xnli": {"accuracy": 74.6}, "xquad": {"f1": 68.0, "exact_match": 51.6}},
    "WordOT": {"xnli": {"accuracy": 75.4}, "xquad": {"f1": 74.7, "exact_match": 59.0}},
}
PAPER_SEEN_LANGUAGES = ("bg", "de", "el", "es", "fr")


def aggregate(task: str, per_seed: list[dict[str, dict[str, float]]], seeds: list[int] | None,
              seen_languages: list[str], **extra) -> dict:
    """Combine per-seed scores into a result dict (module docstring).

    Args:
        task: the task name.
        per_seed: one ``{language: {metric: value}}`` per seed, all with the same languages and metrics.
        seeds: the seeds, in the same order; None for one deterministic run (stored as []).
        seen_languages: languages counted in the "seen" average (those absent from the run are skipped).
        **extra: more top-level fields (model, config, ...).
    """
    if seeds is None and len(per_seed) == 1:
        seeds = []
    elif not per_seed or seeds is None or len(per_seed) != len(seeds):
        raise ValueError(f"need one score dict per seed, got {len(per_seed)} for seeds {seeds}")
    languages = list(per_seed[0])
    metrics = list(per_seed[0][languages[0]])
    table = {}
    for lang in languages:
        table[lang] = {}
        for m in metrics:
            vals = [run[lang][m] for run in per_seed]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0  # the sample std papers report (n - 1)
            table[lang][m] = {"mean": statistics.fmean(vals), "std": std, "per_seed": vals}
    seen = [lang for lang in languages if lang in seen_languages]
    averages = {"all": {m: statistics.fmean(table[lang][m]["mean"] for lang in languages) for m in metrics}}
    if seen:
        averages["seen"] = {m: statistics.fmean(table[lang][m]["mean"] for lang in seen) for m in metrics}
    return {"task": task, "metrics": metrics, "seeds": list(seeds), "languages": table, "averages": averages,
            "seen_languages": seen, **extra}


def markdown_table(result: dict) -> str:
    """One row per language (mean ± std over seeds for each metric), then the averages."""
    metrics = result["metrics"]
    head = "| language | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    rows = []
    for lang, scores in result["languages"].items():
        cells = [f"{scores[m]['mean']:.2f} ± {scores[m]['std']:.2f}" for m in metrics]
        rows.append(f"| {lang} | " + " | ".join(cells) + " |")
    for name, label in (("seen", "average (seen: " + ", ".join(result.get("seen_languages", [])) + ")"),
                        ("all", "average (all)")):
        if name in result["averages"]:
            rows.append(f"| {label} | " + " | ".join(f"{result['averages'][name][m]:.2f}" for m in metrics) + " |")
    return head + "\n".join(rows) + "\n"


def write_result(out_dir: str | Path, name: str, result: dict) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` (a markdown table when the result has languages)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if "languages" in result:
        body = markdown_table(result)
    else:
        body = "| metric | value |\n|---|---|\n" + "".join(
            f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in sorted(result.items()))
    md.write_text(f"## {result.get('task', name)}: {result.get('model', '')}\n\n{body}")
    return js, md


def load_result(path: str | Path) -> dict:
    """A result JSON written by ``write_result``."""
    with open(path, encoding="utf-8") as fh:
        result = json.load(fh)
    for key in ("task", "metrics", "languages", "averages"):
        if key not in result:
            raise ValueError(f"{path}: not a per-language result file (no {key!r})")
    return result


def comparison_table(runs: dict[str, dict]) -> str:
    """The paper's Table 1 rows next to ours: seen-language averages of XNLI accuracy and XQuAD F1 / EM.

    Args:
        runs: ``{label: {"xnli": result or None, "xquad": result or None}}`` for our systems.

    Returns:
        A markdown table; a cell this run lacks is "-". The seen languages of each of our cells are listed
        under the table (the paper's are bg, de, el, es, fr; XQuAD has only de, el, es of them).
    """
    def cell(result: dict | None, metric: str) -> str:
        if not result or "seen" not in result["averages"]:
            return "-"
        return f"{result['averages']['seen'][metric]:.1f}"

    lines = ["| system | XNLI acc | XQuAD F1 / EM |", "|---|---|---|"]
    for name, row in PAPER.items():
        lines.append(f"| {name} (paper) | {row['xnli']['accuracy']:.1f} | "
                     f"{row['xquad']['f1']:.1f} / {row['xquad']['exact_match']:.1f} |")
    notes = []
    for label, row in runs.items():
        xnli, xquad = row.get("xnli"), row.get("xquad")
        qa = "-" if cell(xquad, "f1") == "-" else f"{cell(xquad, 'f1')} / {cell(xquad, 'exact_match')}"
        lines.append(f"| {label} (ours) | {cell(xnli, 'accuracy')} | {qa} |")
        for task, res in (("XNLI", xnli), ("XQuAD", xquad)):
            if res:
                notes.append(f"- {label}, {task}: seen languages {', '.join(res['seen_languages']) or 'none'}; "
                             f"seeds {res['seeds']}; model {res.get('model', '?')}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + ("\n" if notes else "")


def plot_before_after(before: dict, after: dict, metric: str, path: str | Path, *,
                      labels: tuple[str, str] = ("before alignment", "after alignment")) -> Path:
    """Per-language grouped bars of one metric, before vs after alignment, with std error bars.

    Args:
        before, after: result dicts of the same task.
        metric: e.g. "accuracy", "f1", "exact_match".
        path: the PNG to write.
        labels: legend entries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = [lang for lang in before["languages"] if lang in after["languages"]]
    if not langs:
        raise ValueError("the two results share no language")
    for res, what in ((before, "before"), (after, "after")):
        if metric not in res["metrics"]:
            raise ValueError(f"{what} result has no metric {metric!r} (has {res['metrics']})")
    xs = range(len(langs))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(langs) + 2), 3.5))
    for k, (res, label) in enumerate(((before, labels[0]), (after, labels[1]))):
        means = [res["languages"][lang][metric]["mean"] for lang in langs]
        stds = [res["languages"][lang][metric]["std"] for lang in langs]
        ax.bar([x + (k - 0.5) * width for x in xs], means, width, yerr=stds, label=label, capsize=2)
    ax.set_xticks(list(xs), langs)
    ax.set_ylabel(metric)
    ax.set_title(f"{before['task']}: {metric} per language")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
