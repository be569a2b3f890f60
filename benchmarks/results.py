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
from collections import defaultdict
from pathlib import Path
from typing import Iterable

SCHEMA = (
    "run_id", "timestamp", "kind", "provider", "backend", "setting", "mode", "B", "N", "M", "D", "dtype",
    "status", "detail", "value_err", "grad_err", "ref_dtype", "repeats", "p20_ms", "p50_ms", "p80_ms",
    "peak_mem_mb", "speedup_vs_pot", "speedup_vs_geomloss", "exp_count", "floor_ms", "floor_fraction",
    "ot_share", "device", "device_name", "versions", "commit", "command", "load_avg", "note",
)
STATUSES = ("ok", "mismatch", "skipped", "error")
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


def latest(rows: list[dict], device: str, kind: str) -> list[dict]:
    """The rows of the last run (by ``run_id`` order of appearance) of ``kind`` on ``device``."""
    runs = [r["run_id"] for r in rows if r["device"] == device and r["kind"] == kind]
    if not runs:
        return []
    return [r for r in rows if r["run_id"] == runs[-1] and r["kind"] == kind]


def point_key(row: dict) -> tuple:
    """What makes rows comparable: setting, mode, shape and dtype."""
    return (row["setting"], row["mode"], int(row["B"]), int(row["N"]), int(row["M"]), int(row["D"]), row["dtype"])


def speedups(point_rows: list[dict]) -> None:
    """Fill ``speedup_vs_pot`` and ``speedup_vs_geomloss`` of rows of one point, in place.

    speed-up = p50 of ``pot-solve_batch[torch]`` (or ``geomloss[tensorized]``) / the row's p50, on the same
    point in the same run; empty where either side is not an "ok" row.
    """
    base = {label(r): num(r.get("p50_ms")) for r in point_rows if r["status"] == "ok"}
    for row in point_rows:
        mine = num(row.get("p50_ms")) if row["status"] == "ok" else None
        for name, column in ((POT, "speedup_vs_pot"), (GEOMLOSS, "speedup_vs_geomloss")):
            other = base.get(name)
            row[column] = other / mine if mine and other else None


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


def _best_otfast(rows: list[dict], column: str) -> str:
    values = [num(r[column]) for r in rows if r["provider"] == "otfast" and num(r.get(column))]
    return f"{max(values):.1f}x" if values else "-"


def markdown_table(rows: list[dict], modes: tuple[str, ...] = ("forward", "fwd+bwd"), column: str = "p50_ms") -> str:
    """A pivot of sweep rows: one line per point, ``column`` per provider, and for times otfast's best speed-ups.

    Cells: ``column`` of the timed rows (p50 ms, or ``peak_mem_mb`` for the memory table; "-" where empty);
    "wrong" (failed the value check, not timed), "skip" (see the notes), "error".
    Providers skipped on every point get no column.
    Only with ``column="p50_ms"``, the speed-up columns give the best otfast backend's p50 speed-up over
    ``pot-solve_batch[torch]`` and ``geomloss[tensorized]`` on that point: they are ratios of times, and a table
    of another quantity has none.
    """
    rows = [r for r in rows if r["mode"] in modes]
    if not rows:
        return "_no rows_\n"
    providers = list(dict.fromkeys(label(r) for r in rows if r["status"] != "skipped"))
    points: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        points[point_key(row)].append(row)
    ratios = column == "p50_ms"
    head = ["setting", "mode", "B", "N", "M", "D", "dtype", *providers]
    head += ["otfast vs POT", "otfast vs GeomLoss"] if ratios else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(points, key=lambda k: (k[0], k[1], k[2] * k[3] * k[4], k)):
        by_label = {label(r): r for r in points[key]}
        cells = [_cell_text(by_label[p], column) if p in by_label else "" for p in providers]
        if ratios:
            cells += [_best_otfast(points[key], "speedup_vs_pot"), _best_otfast(points[key], "speedup_vs_geomloss")]
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
    """The rows at one shape that ran, side by side: provider, setting, mode, p20/p50/p80, speed-ups, check."""
    rows = [r for r in rows if (int(r["B"]), int(r["N"]), int(r["M"]), int(r["D"])) == (B, N, M, D)
            and r["status"] != "skipped"]
    if not rows:
        return ""
    head = "| setting | mode | provider | p50 ms (p20-p80) | vs POT | vs GeomLoss | check (value / grad rel. err) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["setting"], r["mode"], num(r["p50_ms"]) or math.inf)):
        if row["status"] == "ok":
            time = f"{_ms(num(row['p50_ms']))} ({_ms(num(row['p20_ms']))}-{_ms(num(row['p80_ms']))})"
        else:
            time = row["status"]
        ratios = [f"{num(row[c]):.1f}x" if num(row.get(c)) else "-" for c in ("speedup_vs_pot", "speedup_vs_geomloss")]
        errs = " / ".join(f"{num(row[c]):.0e}" if num(row.get(c)) is not None else "-"
                          for c in ("value_err", "grad_err"))
        verdict = {"ok": "ok", "mismatch": "WRONG", "error": "error"}[row["status"]]
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
    otfast backend's speed-up over POT ``solve_batch`` and GeomLoss (tensorized); 1x dashed.
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
        for column, name in (("speedup_vs_pot", "over POT solve_batch"), ("speedup_vs_geomloss", "over GeomLoss")):
            best: dict[int, float] = {}
            for r in mine:
                if r["provider"] == "otfast" and num(r.get(column)):
                    best[size(r)] = max(best.get(size(r), 0.0), num(r[column]))
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

def _between(text: str, start: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {start} / {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"


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
            start, end = _markers(name)
            placeholder = NO_GPU if name == "cuda" else "No CPU run yet."
            parts.append(f"## {title}\n\n{start}\n{placeholder}\n{end}\n")
        text = "\n".join(parts)
    path.write_text(_between(text, *_markers(device), body))


README_MARKERS = ("<!-- bench-table:start -->", "<!-- bench-table:end -->")


def update_readme(path: str | Path, body: str) -> None:
    """Replace the text between the README's bench-table markers.

    Raises:
        ValueError: the markers are missing.
    """
    path = Path(path)
    path.write_text(_between(path.read_text(), *README_MARKERS, body))
