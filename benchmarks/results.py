"""The results CSV and everything generated from it: markdown tables, the PNG plot, RESULTS.md, the README table.

Nothing here measures anything: every output is a function of the CSV rows, so that a CSV fetched from a
GPU machine renders the same way (``python -m benchmarks.report --render results.csv``).

Row ``status``: "ok" (checked, then timed), "mismatch" (its answer differs from the reference: not timed),
"skipped" (not run here; ``detail`` says why) or "error" (it raised; ``detail`` has the message).
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

SCHEMA = (
    "run_id", "timestamp", "kind", "provider", "backend", "setting", "mode", "B", "N", "M", "D", "dtype",
    "status", "detail", "value_err", "grad_err", "ref_dtype", "repeats", "p20_ms", "p50_ms", "p80_ms",
    "peak_mem_mb", "speedup_vs_pot", "speedup_vs_geomloss", "exp_count", "floor_ms", "floor_fraction",
    "ot_share", "device", "device_name", "versions", "commit", "command", "load_avg", "note",
)
STATUSES = ("ok", "mismatch", "skipped", "error")
GRAD_UNCHECKED = "gradient not checked (unrolled)"  # the detail of an "ok" row whose gradient was only reported
POT = "pot-solve_batch[torch]"
GEOMLOSS = "geomloss[tensorized]"
SECTIONS = {"cpu": "CPU", "cuda": "GPU"}
NO_GPU = ("No GPU run of this report yet (the first GPU measurements, by hand-written scripts, are in "
          "`benchmarks/h200-2026-11-29.md`). On a CUDA machine, `bash benchmarks/gpu_suite.sh OUT` then "
          "`./dev python -m benchmarks.report --render OUT/results.csv --update-docs` writes this section.")


def label(row: dict) -> str:
    """``provider[backend]``."""
    return f"{row['provider']}[{row['backend']}]"


def num(value) -> float | None:
    """A CSV cell as a float, None when empty."""
    if value is None or value == "":
        return None
    return float(value)


# ---------------------------------------------------------------- CSV

def append_rows(path: str | Path, rows: Iterable[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new).

    Raises:
        ValueError: the file's header is not ``SCHEMA``, or a row has a key outside it or a bad status.
    """
    path = Path(path)
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(SCHEMA)
        if extra:
            raise ValueError(f"row has columns outside the schema: {sorted(extra)}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {row.get('status')!r}")
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as fh:
            header = tuple(next(csv.reader(fh), ()))
        if header != SCHEMA:
            raise ValueError(f"{path} has columns {header}, expected {SCHEMA}; move the old file away")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SCHEMA)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in SCHEMA})


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_rows(path: str | Path) -> list[dict]:
    """All rows of the CSV at ``path`` as dicts of strings.

    Raises:
        ValueError: the header is not ``SCHEMA``.
    """
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != SCHEMA:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {SCHEMA}")
        return list(reader)


def runs(rows: list[dict], device: str, kind: str) -> list[str]:
    """The ``run_id``s of the runs of ``kind`` on ``device``, in order of appearance."""
    return list(dict.fromkeys(r["run_id"] for r in rows if r["device"] == device and r["kind"] == kind))


def latest(rows: list[dict], device: str, kind: str) -> list[dict]:
    """The rows of the last run (by ``run_id`` order of appearance) of ``kind`` on ``device``."""
    ids = runs(rows, device, kind)
    if not ids:
        return []
    return [r for r in rows if r["run_id"] == ids[-1] and r["kind"] == kind]


def point_key(row: dict) -> tuple:
    """What makes rows comparable: setting, mode, shape and dtype."""
    return (row["setting"], row["mode"], int(row["B"]), int(row["N"]), int(row["M"]), int(row["D"]), row["dtype"])


def speedup(row: dict, base: dict | None) -> float | None:
    """p50 of ``base`` / p50 of ``row``; None unless both are "ok" rows with a p50."""
    mine, other = (num(r.get("p50_ms")) if r is not None and r["status"] == "ok" else None for r in (row, base))
    return other / mine if mine and other else None


def speedups(point_rows: list[dict]) -> None:
    """Fill ``speedup_vs_pot`` and ``speedup_vs_geomloss`` of rows of one point, in place (the CSV's columns).

    speed-up = p50 of ``pot-solve_batch[torch]`` (or ``geomloss[tensorized]``) / the row's p50, on the same
    point in the same call of the report; empty where either side is not an "ok" row. The tables and the plot
    do not read these columns: they compute the ratios (``speedup``, ``best_otfast``) from the rows they show,
    which may come from several calls of one run.
    """
    base = {label(r): r for r in point_rows}
    for row in point_rows:
        row["speedup_vs_pot"], row["speedup_vs_geomloss"] = (speedup(row, base.get(name)) for name in (POT, GEOMLOSS))


def one_per_cell(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows with one row per (point, provider), and the kept rows of the cells measured more than once.

    Where rows measure one provider on one point again (the GPU suite's sweep step shares the goal steps'
    run_id and repeats three of their points), the latest row in ``rows``' order (CSV order; with ``--render
    --run``, the order the runs are named) is kept, in the place of the first.
    """
    cells: dict[tuple, dict] = {}
    counts: Counter = Counter()
    for row in rows:
        key = (point_key(row), label(row))
        cells[key] = row
        counts[key] += 1
    return list(cells.values()), [row for key, row in cells.items() if counts[key] > 1]


def by_point(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The rows by ``point_key``, then by ``label``, in order of appearance.

    Raises:
        ValueError: two rows of one provider on one point (``one_per_cell`` chooses between them).
    """
    points: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        cells = points[point_key(row)]
        if label(row) in cells:
            raise ValueError(f"{label(row)} has two rows at {point_key(row)}: keep one (results.one_per_cell)")
        cells[label(row)] = row
    return points


# ---------------------------------------------------------------- tables

def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell_text(row: dict, column: str) -> str:
    if row["status"] == "ok":
        value = num(row.get(column))
        return "-" if value is None else _ms(value)
    return {"mismatch": "wrong", "skipped": "skip", "error": "error"}[row["status"]]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def best_otfast(cells: dict[str, dict], base: str) -> float | None:
    """The best speed-up of an otfast backend over the provider labelled ``base`` among one point's ``cells``
    (label -> row), or None where no otfast row or no ``base`` row is "ok"."""
    values = [v for r in cells.values() if r["provider"] == "otfast" and (v := speedup(r, cells.get(base)))]
    return max(values, default=None)


def markdown_table(rows: list[dict], modes: tuple[str, ...] = ("forward", "fwd+bwd"), column: str = "p50_ms") -> str:
    """A pivot of sweep rows: one line per point, ``column`` per provider, and for times otfast's best speed-ups.

    Cells: ``column`` of the timed rows (p50 ms, or ``peak_mem_mb`` for the memory table; "-" where empty);
    "wrong" (failed the value check, not timed), "skip" (see the notes), "error".
    Providers skipped on every point get no column.
    Only with ``column="p50_ms"``, the speed-up columns give the best otfast backend's p50 speed-up over
    ``pot-solve_batch[torch]`` and ``geomloss[tensorized]`` on that point, computed from the cells of its line
    (whichever call of the run measured them): they are ratios of times, and a table of another quantity has none.

    Raises:
        ValueError: two rows of one provider on one point (``one_per_cell`` chooses between them).
    """
    rows = [r for r in rows if r["mode"] in modes]
    if not rows:
        return "_no rows_\n"
    providers = list(dict.fromkeys(label(r) for r in rows if r["status"] != "skipped"))
    points = by_point(rows)
    ratios = column == "p50_ms"
    head = ["setting", "mode", "B", "N", "M", "D", "dtype", *providers]
    head += ["otfast vs POT", "otfast vs GeomLoss"] if ratios else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(points, key=lambda k: (k[0], k[1], k[2] * k[3] * k[4], k)):
        by_label = points[key]
        cells = [_cell_text(by_label[p], column) if p in by_label else "" for p in providers]
        if ratios:
            cells += [_ratio(best_otfast(by_label, base)) for base in (POT, GEOMLOSS)]
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> str:
    """One line per distinct (provider, status, reason) of the rows that were not timed."""
    seen: dict[tuple, int] = defaultdict(int)
    for row in rows:
        if row["status"] != "ok":
            seen[(label(row), row["status"], row["detail"])] += 1
    lines = [f"- `{name}` {status} ({count} point{'s' * (count > 1)}): {detail}"
             for (name, status, detail), count in seen.items()]
    return "\n".join(lines) + ("\n" if lines else "")


def headline(rows: list[dict], B: int, N: int, M: int, D: int) -> str:
    """The rows at one shape that ran, side by side: provider, setting, mode, p20/p50/p80, speed-ups over POT
    and GeomLoss on the same point (from these rows), check ("ok", or "value ok, gradient not checked" where the
    gradient error is only reported, "WRONG", "error") with the value and gradient errors.

    Raises:
        ValueError: two rows of one provider on one point (``one_per_cell`` chooses between them).
    """
    rows = [r for r in rows if (int(r["B"]), int(r["N"]), int(r["M"]), int(r["D"])) == (B, N, M, D)
            and r["status"] != "skipped"]
    if not rows:
        return ""
    points = by_point(rows)
    head = "| setting | mode | provider | p50 ms (p20-p80) | vs POT | vs GeomLoss | check (value / grad rel. err) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["setting"], r["mode"], num(r["p50_ms"]) or math.inf)):
        if row["status"] == "ok":
            time = f"{_ms(num(row['p50_ms']))} ({_ms(num(row['p20_ms']))}-{_ms(num(row['p80_ms']))})"
            verdict = "value ok, gradient not checked" if row["detail"] == GRAD_UNCHECKED else "ok"
        else:
            time = row["status"]
            verdict = {"mismatch": "WRONG", "error": "error"}[row["status"]]
        ratios = [_ratio(speedup(row, points[point_key(row)].get(base))) for base in (POT, GEOMLOSS)]
        errs = " / ".join(f"{num(row[c]):.0e}" if num(row.get(c)) is not None else "-"
                          for c in ("value_err", "grad_err"))
        lines.append(f"| {row['setting']} | {row['mode']} | `{label(row)}` | {time} | {ratios[0]} | {ratios[1]} | "
                     f"{verdict} ({errs}) |")
    return "\n".join(lines) + "\n"


def step_table(rows: list[dict]) -> str:
    """The encoder-step rows: the step without the OT term, with it per OT implementation, and the OT share."""
    if not rows:
        return ""
    lines = ["| model | B pairs | tokens (max) | D | dtype | OT term | step p50 ms (p20-p80) | OT share |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["provider"], r["mode"] != "step", r["backend"])):
        what = {"step": "none (regulariser only)"}.get(row["mode"], f"`{row['backend']}`")
        time = (f"{_ms(num(row['p50_ms']))} ({_ms(num(row['p20_ms']))}-{_ms(num(row['p80_ms']))})"
                if row["status"] == "ok" else row["status"])
        share = num(row.get("ot_share"))
        lines.append(f"| {row['provider']} | {row['B']} | {row['N']} | {row['D']} | {row['dtype']} | {what} | {time} | "
                     f"{'-' if share is None else f'{100 * share:.1f}%'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot

def plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Time and speed-up against problem size (B N M), one column per setting, from sweep rows.

    Top: p50 ms per provider (forward+backward where measured, else forward), log-log. Bottom: the best
    otfast backend's speed-up over POT ``solve_batch`` and GeomLoss (tensorized) among the rows of each point;
    1x dashed.

    Raises:
        ValueError: two rows of one provider on one point (``one_per_cell`` chooses between them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ok = [r for r in rows if r["status"] == "ok" and r["kind"] == "sweep"]
    settings = sorted({r["setting"] for r in ok}) or ["-"]
    fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 8), squeeze=False)
    for col, setting in enumerate(settings):
        mine = [r for r in ok if r["setting"] == setting]
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in mine) else "forward"
        mine = [r for r in mine if r["mode"] == mode]
        size = lambda r: int(r["B"]) * int(r["N"]) * int(r["M"])  # noqa: E731
        top, bottom = axes[0][col], axes[1][col]
        for name in dict.fromkeys(label(r) for r in mine):
            pts = sorted((size(r), num(r["p50_ms"])) for r in mine if label(r) == name)
            top.plot(*zip(*pts), marker="o", label=name)
        points = by_point(mine)
        for base, name in ((POT, "over POT solve_batch"), (GEOMLOSS, "over GeomLoss")):
            best: dict[int, float] = {}
            for (_, _, B, N, M, _, _), cells in points.items():
                ratio = best_otfast(cells, base)
                if ratio:
                    best[B * N * M] = max(best.get(B * N * M, 0.0), ratio)
            if best:
                bottom.plot(*zip(*sorted(best.items())), marker="s", label=f"otfast {name}")
        bottom.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap there
            ax.set_xlabel("B x N x M")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        top.set_ylabel(f"p50 ms ({mode})")
        top.set_title(f"{setting} setting")
        bottom.set_ylabel("speed-up (x)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- documents

def _pattern(start: str, end: str) -> re.Pattern:
    return re.compile(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), re.S)


def _inside(text: str, start: str, end: str) -> str | None:
    """The text between the first ``start`` and the ``end`` after it, None when they are missing."""
    match = _pattern(start, end).search(text)
    return match and match.group(1)


def _between(text: str, start: str, end: str, body: str) -> str:
    pattern = _pattern(start, end)
    if not pattern.search(text):
        raise ValueError(f"markers {start} / {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def _markers(block: str, device: str) -> tuple[str, str]:
    return f"<!-- {block}:{device}:start -->", f"<!-- {block}:{device}:end -->"


RESULTS_HEADER = """# otfast benchmark results

Generated by `./dev python -m benchmarks.report --update-docs` (and `benchmarks.step --update-docs`) from the
tracked results CSV; do not edit by hand. Each section holds the latest run on that kind of device; a run on
one kind keeps the other's section. Providers, settings and the value check: `benchmarks/providers.py`.
Cells are p50 milliseconds; "wrong" = the provider's answer differs from the otfast torch reference (it is
then not timed), "skip" = not run (reasons under the table). The first GPU measurements (an H200, by
hand-written scripts at commit `116ddf7`) are transcribed in `benchmarks/h200-2026-11-29.md`.
"""


def update_results(path: str | Path, device: str, body: str) -> None:
    """Replace the ``device`` section ("cpu" or "cuda") of RESULTS.md, creating the file when missing."""
    path = Path(path)
    if path.exists():
        text = path.read_text()
    else:
        parts = [RESULTS_HEADER]
        for name, title in SECTIONS.items():
            start, end = _markers("results", name)
            placeholder = NO_GPU if name == "cuda" else "No CPU run yet."
            parts.append(f"## {title}\n\n{start}\n{placeholder}\n{end}\n")
        text = "\n".join(parts)
    path.write_text(_between(text, *_markers("results", device), body))


README_MARKERS = ("<!-- bench-table:start -->", "<!-- bench-table:end -->")
README_FOOTER = "Full results, commands and notes: `benchmarks/RESULTS.md`."


def update_readme(path: str | Path, tables: dict[str, str]) -> None:
    """Rewrite the README's bench-table block: per device ("cpu", then "cuda") its table between markers of its
    own, then a pointer to RESULTS.md.

    The devices in ``tables`` get that table; the others keep the one the block holds (a run on one kind of
    device keeps the other's table), or, in an empty block, a placeholder.

    Raises:
        ValueError: the bench-table markers are missing, or a device not in ``tables`` has no markers of its own
            in a block that holds text (a README from before the per-device markers: its table would be lost;
            render every device at once, ``--render`` of CSVs holding both, to write them).
    """
    path = Path(path)
    text = path.read_text()
    old = _inside(text, *README_MARKERS)
    if old is None:
        raise ValueError(f"markers {README_MARKERS[0]} / {README_MARKERS[1]} not found")
    parts = []
    for device, title in SECTIONS.items():
        start, end = _markers("bench-table", device)
        body = tables.get(device) or _inside(old, start, end)
        if body is None and old.strip():
            raise ValueError(f"the bench table has no {start} / {end} around its {title} table, which would be lost; "
                             "render every device at once (--render of CSVs holding both) to write them")
        parts.append(f"{start}\n{(body or f'_No {title} run yet._').rstrip()}\n{end}\n")
    path.write_text(_between(text, *README_MARKERS, "\n".join(parts) + "\n" + README_FOOTER))
