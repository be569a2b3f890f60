"""The benchmark sweep: every provider on the same batches, checked, timed, written to CSV, rendered.

Usage::

    python -m benchmarks.report [--quick] [--out DIR] [--device cpu|cuda] [--budget S] [--note TEXT]
    python -m benchmarks.report --render DIR/results.csv     # only re-render the table and plot
    python -m benchmarks.report --quick --update-docs        # also the tracked CSV, RESULTS.md and README table

For every point (setting, mode, B, N, M, D, dtype) it draws one batch (``providers.make_inputs``), computes
the otfast torch reference on it (float64 where cheap), then for every provider: skips it with a reason
(unavailable, wrong device, estimated memory or time over budget), or runs it once and checks its values
(and gradients) against the reference, and times it only if the check passes (warm-up, then up to
``--repeats`` calls within ``--budget`` seconds: p20/p50/p80 ms, CUDA-synchronised; peak extra memory on
CUDA). Rows are appended to ``DIR/results.csv`` point by point (``DIR`` defaults to ``runs/benchmarks``,
outside version control); at the end the markdown table (``DIR/table.md``) and the plot
(``DIR/plot-<device>.png``) are regenerated from the CSV. Nothing tracked changes unless ``--update-docs``
is given: then the rows go to ``benchmarks/results/`` and this device's section of ``benchmarks/RESULTS.md``
and table in the README are regenerated too (the other device's stay), and the command says which files it
wrote.

Full sweep: B in {8, 64, 256} x N = M in {16, 32, 64, 128, 256, 512}, D = 768, forward and forward+backward,
settings "fixed" and "paper", plus the B=32, N=M=40 point of issues 2 and 4. ``--quick``: that point and a
few small ones (under 2 minutes on a 2-core CPU).

On CUDA each row also gets the exponential-throughput floor (an H100/H200 computes about 3.9e12 exp/s on its
special-function units: 132 SMs x 16 per clock x ~1.8 GHz; a log-domain Sinkhorn cannot beat the count of
exponentials it needs divided by that rate): ``exp_count`` (counted
by ``Setting.exponentials``: per update 2 B N M for OT(a, b) plus B N^2 + B M^2 for the two symmetric
problems when debiased; updates = initialisation + annealing/iterations + final extrapolation; the
backward adds one more of each) over 3.9e12 exp/s, and the fraction of that floor the p50 reaches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from itertools import product
from pathlib import Path

import torch

from . import results as res
from .providers import SETTINGS, Provider, Setting, check, grads_checked, make_inputs, providers, reference
from .timing import REPO, commit, device_name, load_average, measure, synchronize, versions

EXP_PER_S = 3.9e12
FULL_B = (8, 64, 256)
FULL_N = (16, 32, 64, 128, 256, 512)
D_MODEL = 768
ISSUE_POINT = (32, 40, 40)
QUICK_POINTS = (
    ("fixed", "fwd+bwd", *ISSUE_POINT), ("paper", "fwd+bwd", *ISSUE_POINT), ("fixed", "forward", *ISSUE_POINT),
    ("fixed", "fwd+bwd", 8, 16, 16), ("paper", "fwd+bwd", 8, 16, 16),
)
DEFAULT_OUT = REPO / "runs" / "benchmarks"
DOCS_OUT = REPO / "benchmarks" / "results"  # the tracked results behind RESULTS.md and the README table
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


# The Triton v2 goals (issue 14), side by side with POT, GeomLoss and flash-sinkhorn in one run on a GPU.
GOAL_POINTS = (("fixed", "fwd+bwd", 64, 64, 64), ("paper", "fwd+bwd", 24, 48, 48), ("fixed", "forward", 64, 128, 128),
               ("fixed", "fwd+bwd", 64, 512, 512), ("paper", "fwd+bwd", 1, 2048, 2048))


def sweep_points(quick: bool, goals: bool = False) -> list[tuple[str, str, int, int, int]]:
    """(setting, mode, B, N, M) of the sweep, smallest work first (so time estimates extrapolate upwards)."""
    if goals:
        points = list(GOAL_POINTS)
    elif quick:
        points = list(QUICK_POINTS)
    else:
        points = [(s, m, B, N, N) for s, m, B, N in product(SETTINGS, ("forward", "fwd+bwd"), FULL_B, FULL_N)]
        points += [(s, m, *ISSUE_POINT) for s, m in product(SETTINGS, ("forward", "fwd+bwd"))]
    return sorted(dict.fromkeys(points), key=lambda p: (p[2] * p[3] * p[4], p[0], p[2], p[1]))


def available_memory(device: str) -> float:
    """Bytes a provider may use: half of what is free (CUDA) or available (CPU, /proc/meminfo)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2


class Estimates:
    """Seconds per call extrapolated linearly in B (N M + N^2 + M^2) from the largest point measured so far.

    Only from a point at least 1/16 of the work: small points are dominated by per-call overheads, and
    extrapolating them would skip points that fit. ``enabled=False`` never estimates (the quick sweep,
    whose points are all small).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.seen: dict[tuple, tuple[float, float]] = {}

    @staticmethod
    def work(B: int, N: int, M: int) -> float:
        return B * (N * M + N * N + M * M)

    def add(self, key: tuple, B: int, N: int, M: int, seconds: float) -> None:
        work = self.work(B, N, M)
        if key not in self.seen or work >= self.seen[key][0]:
            self.seen[key] = (work, seconds)

    def get(self, key: tuple, B: int, N: int, M: int) -> float | None:
        if not self.enabled or key not in self.seen:
            return None
        work, seconds = self.seen[key]
        ratio = self.work(B, N, M) / work
        return seconds * ratio if ratio <= 16 else None


def run_once(provider: Provider, x: torch.Tensor, y: torch.Tensor, setting: Setting, backward: bool):
    """One call: ``(values [B], (dx, dy) or None)``."""
    if not backward:
        with torch.no_grad():
            return provider.values(x, y, setting), None
    xg, yg = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    values = provider.values(xg, yg, setting)
    return values, torch.autograd.grad(values.sum(), (xg, yg))


def run_once_timed(prov: Provider, x: torch.Tensor, y: torch.Tensor, setting: Setting, backward: bool,
                   device: torch.device):
    """``(run_once's result, seconds)`` of one call, the device synchronised."""
    start = dt.datetime.now()
    out = run_once(prov, x, y, setting, backward)
    synchronize(device)
    return out, (dt.datetime.now() - start).total_seconds()


def timed_call(provider: Provider, x: torch.Tensor, y: torch.Tensor, setting: Setting, backward: bool):
    """The call the timing repeats."""
    if not backward:
        def call():
            with torch.no_grad():
                provider.values(x, y, setting)
        return call
    xg, yg = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)

    def call():
        xg.grad = yg.grad = None
        provider.values(xg, yg, setting).sum().backward()
    return call


def run_point(point: tuple, plist: list[Provider], *, device: str, dtype: str, D: int, budget: float,
              repeats: int, estimates: Estimates, base: dict, refs: dict | None = None, skip_slow: bool = True,
              log=print) -> list[dict]:
    """Check and time every provider on one point.

    Args:
        point: (setting name, mode "forward" or "fwd+bwd", B, N, M).
        plist: providers to run.
        device, dtype, D: where, in which dtype ("fp32", ...), at which feature size.
        budget: seconds per provider and point (timing stops adding calls past it; a provider whose call is
            estimated above it is skipped).
        repeats: timed calls at most.
        estimates: time estimates, updated with what this point measures.
        refs: a cache of the last reference (both modes of a shape share one), or None.
        skip_slow: skip timing a provider whose checked call took over 3 x ``budget`` (off in the quick
            sweep, whose points are all small: there a slow call means a loaded host, not a big problem).
        base: columns every row carries (run_id, device_name, versions, commit, command, ...).
        log: progress printer.

    Returns:
        One CSV row (dict) per provider, speed-ups filled in.
    """
    setting_name, mode, B, N, M = point
    setting, backward = SETTINGS[setting_name], mode == "fwd+bwd"
    torch_dtype = DTYPES[dtype]
    elt = torch.empty((), dtype=torch_dtype).element_size()
    head = dict(base, kind="sweep", setting=setting_name, mode=mode, B=B, N=N, M=M, D=D, dtype=dtype,
                load_avg=load_average())
    x, y = make_inputs(B, N, M, D, dtype=torch_dtype, device=device)
    n_updates = len(setting.eps_list(x, y)) + 2
    exp_count = setting.exponentials(B, N, M, n_updates, backward)
    head["exp_count"] = exp_count
    floor_ms = exp_count / EXP_PER_S * 1e3 if device == "cuda" else None

    cheap = device == "cuda" or B * (N * M + N * N + M * M) * n_updates < 5e8
    ref_dtype = torch.float64 if cheap else torch_dtype
    ref_key = ("reference", setting_name, str(ref_dtype))
    shape_key = (setting_name, B, N, M, D, dtype)
    refs = {} if refs is None else refs
    if shape_key not in refs:
        est = estimates.get(ref_key, B, N, M)
        if est is not None and est > 3 * budget:
            detail = f"the reference would take ~{est:.0f} s here (> 3 x budget {budget:.0f} s)"
            return [dict(head, provider=p.name, backend=p.backend, status="skipped", detail=detail) for p in plist]
        start = dt.datetime.now()
        refs.clear()
        refs[shape_key] = reference(x, y, setting, backward=True, dtype=ref_dtype)
        estimates.add(ref_key, B, N, M, (dt.datetime.now() - start).total_seconds())
    ref = refs[shape_key]
    head["ref_dtype"] = ref.dtype

    rows = []
    for prov in plist:
        row = dict(head, provider=prov.name, backend=prov.backend)
        rows.append(row)
        fixed = prov.skip_reason(device, setting) or (prov.sizes and prov.sizes(N, M))  # said once, in "Not timed"
        reason = fixed
        need = prov.memory(B, N, M, D, setting, elt, backward)
        key = (prov.label, setting_name, mode, dtype)
        est = estimates.get(key, B, N, M)
        if reason is None and need > available_memory(device):
            reason = f"needs ~{need / 2**30:.1f} GiB (estimate), {available_memory(device) / 2**30:.1f} GiB allowed"
        if reason is None and est is not None and est > budget:
            reason = f"~{est:.1f} s per call (extrapolated from a smaller point) > budget {budget:.0f} s"
        if reason:
            row.update(status="skipped", detail=reason)
            if not fixed:
                log(f"  {prov.label}: skipped ({reason})")
            continue
        try:
            (values, grads), first = run_once_timed(prov, x, y, setting, backward, device)
            if first > budget / 10:  # a first call can include a JIT compile: the estimate takes a second one
                first = run_once_timed(prov, x, y, setting, backward, device)[1]
        except Exception as exc:  # a provider failing is a result to record, not a reason to stop the sweep
            row.update(status="error", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log(f"  {prov.label}: error {row['detail']}")
            continue
        estimates.add(key, B, N, M, first)
        verdict = check(values, grads, ref, check_grad=grads_checked(prov, setting))
        row.update(value_err=verdict.value_err, grad_err=verdict.grad_err)
        if not verdict.ok:
            row.update(status="mismatch", detail=verdict.detail)
            log(f"  {prov.label}: WRONG ({verdict.detail})")
            continue
        if skip_slow and first > 3 * budget:
            row.update(status="skipped", detail=f"one call took {first:.1f} s > 3 x budget {budget:.0f} s")
            log(f"  {prov.label}: skipped ({row['detail']})")
            continue
        timing = measure(timed_call(prov, x, y, setting, backward), device, warmup=1 if first < budget / 10 else 0,
                         repeats=repeats, budget_s=budget)
        row.update(status="ok", detail="" if grads_checked(prov, setting) else res.GRAD_UNCHECKED,
                   repeats=timing.repeats, p20_ms=timing.p20, p50_ms=timing.p50, p80_ms=timing.p80,
                   peak_mem_mb=timing.peak_mem_mb)
        if floor_ms is not None:
            row.update(floor_ms=floor_ms, floor_fraction=floor_ms / timing.p50)
        log(f"  {prov.label}: p50 {timing.p50:.2f} ms ({timing.repeats} calls)")
    res.speedups(rows)
    return rows


def render(rows: list[dict], devices: list[str], out: Path, results_md: Path | None, readme: Path | None,
           log=print) -> None:
    """Regenerate ``out/table.md``, ``out/plot-<device>.png`` and, of the ``devices`` only, the RESULTS.md sections
    and README tables from CSV ``rows`` (the other devices' sections and tables stay as they are)."""
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for device in ("cpu", "cuda"):
        sweep, again = res.one_per_cell(res.latest(rows, device, "sweep"))
        step = res.latest(rows, device, "step")
        if not (sweep or step):
            continue
        png = out / f"plot-{device}.png"
        if sweep:
            meta = sweep[0]
            res.plot(sweep, png, title=f"{meta['device_name']} - commit {meta['commit']} - {meta['timestamp'][:10]}")
            tables[device] = readme_table(device, sweep, again)
            count = len(res.runs(rows, device, "sweep"))
            if count > 1:
                log(f"{device}: run {meta['run_id']} only, the latest of {count} (--render CSV --run ID ... renders "
                    "named runs as one)")
        if device in devices and results_md is not None:
            res.update_results(results_md, device, device_section(sweep, step, png, results_md.parent, again))
            log(f"updated the {device} section of {results_md}")
    (out / "table.md").write_text("\n".join(tables.values()) or "_no results yet_\n")
    log(f"wrote {out / 'table.md'} and the plots in {out}")
    if readme is not None:
        try:
            res.update_readme(readme, {device: table for device, table in tables.items() if device in devices})
            log(f"updated the benchmark table of {readme}")
        except ValueError as exc:
            log(f"README not updated: {exc}")


def readme_table(device: str, sweep: list[dict], again: list[dict]) -> str:
    """The README table of ``device``: the forward+backward lines of its latest run (``sweep``, one row per cell:
    ``res.one_per_cell``, whose cells measured more than once are ``again``), headed by the device and the commits
    and commands of the rows it shows."""
    shown = [r for r in sweep if r["mode"] == "fwd+bwd"]
    about = [sweep[0]["device_name"], listed("commit", shown, "commit"), "p50 ms, forward+backward",
             listed("command", shown, "command"), measured_again([r for r in again if r["mode"] == "fwd+bwd"])]
    return (f"**{res.SECTIONS[device]}** ({'; '.join(a for a in about if a)})\n\n"
            + res.markdown_table(shown))


def listed(name: str, rows: list[dict], column: str) -> str:
    """``name: `value``` for the one value of ``column`` in ``rows``, ``names: `a`, `b``` for several (in order of
    appearance: a run merged from several calls lists each call's), "" for none."""
    values = list(dict.fromkeys(r[column] for r in rows))
    return (f"{name}{'s' * (len(values) > 1)}: " + ", ".join(f"`{v}`" for v in values)) if values else ""


def measured_again(cells: list[dict]) -> str:
    """What a table says of the ``cells`` of its run measured more than once (``res.one_per_cell``), or ""."""
    if not cells:
        return ""
    return f"{len(cells)} cell{'s' * (len(cells) > 1)} measured more than once in this run: each shows the latest"


def device_section(sweep: list[dict], step: list[dict], png: Path, base_dir: Path,
                   again: list[dict] = ()) -> str:
    """The RESULTS.md section of one device from its latest sweep rows (one per cell: ``res.one_per_cell``, whose
    cells measured more than once are ``again``) and step rows."""
    parts = []
    if sweep:
        m = sweep[0]
        load = [res.num(r["load_avg"]) for r in sweep if res.num(r.get("load_avg")) is not None]
        parts.append(f"Device: **{m['device_name']}**. {listed('Commit', sweep, 'commit')}, {m['timestamp']}.\n\n"
                     f"{listed('Command', sweep, 'command')}\n\nVersions: {m['versions'].replace(';', ', ')}\n")
        if again:
            parts.append(f"{measured_again(again)}.")
        if load:
            parts.append(f"Host 1-minute load average during the run: {min(load):.1f} to {max(load):.1f}.")
        if m.get("note"):
            parts.append(f"Note: {m['note']}")
        B, N, M = ISSUE_POINT
        point = res.headline(sweep, B, N, M, D_MODEL)
        if point:
            parts.append(f"### B={B}, N=M={N}, D={D_MODEL}, side by side (issues 2 and 4)\n\n"
                         "`fixed` is issue 4's point (cosine, eps 0.05, 100 iterations); `paper` is "
                         "`otfast.sinkhorn_loss`'s defaults (GeomLoss's, as the paper used them).\n\n" + point)
        parts.append("### Sweep (p50 ms)\n\n" + res.markdown_table(sweep))
        if any(res.num(r.get("floor_fraction")) for r in sweep):
            parts.append("### Exponential-throughput floor\n\n"
                         "floor = exponentials / 3.9e12 per second (an H100/H200's special-function throughput). "
                         "Counting (`Setting.exponentials`): one soft-min "
                         "pass over an N x M cost is N M exponentials; an update of OT(a, b) runs two (2 B N M), "
                         "each symmetric problem of the debiased loss one (B N^2, B M^2); updates = initialisation + "
                         "annealing or fixed iterations + final extrapolation; the backward recomputes each plan "
                         "once more.\n\n" + floor_table(sweep))
        if any(res.num(r.get("peak_mem_mb")) is not None for r in sweep):
            parts.append("### Peak extra memory (MiB, torch.cuda.max_memory_allocated)\n\n"
                         + res.markdown_table(sweep, column="peak_mem_mb"))
        else:
            parts.append("Peak memory: n/a on CPU (torch's CPU allocator keeps no peak counter, and RSS deltas on "
                         "a shared host are noise).")
        text = res.notes(sweep)
        if text:
            parts.append("### Not timed\n\n" + text)
        if png.exists():
            parts.append(f"![time and speed-up against size]({os.path.relpath(png, base_dir)})")
    if step:
        m = step[0]
        parts.append(f"### One alignment step of an encoder, with and without the OT term\n\nCommand: "
                     f"`{m['command']}` (commit `{m['commit']}`, {m['timestamp']}, {m['device_name']}).\n\n"
                     + res.step_table(step) + ("\n" + res.notes(step) if res.notes(step) else ""))
    return "\n\n".join(p.rstrip() for p in parts) + "\n"


def floor_table(rows: list[dict]) -> str:
    """otfast rows with their exponential count, floor and the fraction of it reached."""
    lines = ["| setting | mode | B | N | M | provider | exponentials | floor ms | p50 ms | fraction of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] == "otfast" and res.num(r.get("floor_fraction")):
            lines.append(f"| {r['setting']} | {r['mode']} | {r['B']} | {r['N']} | {r['M']} | `{res.label(r)}` | "
                         f"{int(float(r['exp_count'])):.3g} | {float(r['floor_ms']):.3g} | {float(r['p50_ms']):.3g} | "
                         f"{float(r['floor_fraction']):.2f} |")
    return "\n".join(lines) + "\n"


def base_columns(device: str, command: str, note: str, run_id: str | None = None) -> dict:
    """Columns every row of this run shares (``run_id``: the time and device unless given)."""
    now = dt.datetime.now(dt.timezone.utc)
    return dict(run_id=run_id or f"{now:%Y%m%dT%H%M%S}-{device}", timestamp=now.strftime("%Y-%m-%d %H:%M UTC"),
                device=device, device_name=device_name(device), versions=versions(), commit=commit(), command=command,
                note=note)


def add_docs_arguments(ap: argparse.ArgumentParser) -> None:
    """``--update-docs`` and the files it writes (shared with ``benchmarks.step``)."""
    ap.add_argument("--update-docs", action="store_true",
                    help="write to the tracked benchmarks/results/ and regenerate benchmarks/RESULTS.md and the README "
                         "table (modifies tracked files)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="with --update-docs")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="with --update-docs")


def docs_targets(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """(output folder, RESULTS.md or None, README or None) for the parsed arguments."""
    if args.update_docs:
        return args.out or DOCS_OUT, args.results, args.readme
    return args.out or DEFAULT_OUT, None, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few points, a few minutes on a 2-core CPU")
    ap.add_argument("--goals", action="store_true",
                    help="only the five Triton v2 goal points (B=64 N=M=64 fixed, B=24 N=M=48 paper, B=64 N=M=128 "
                         "fixed forward, B=64 N=M=512 fixed, B=1 N=M=2048 paper; use a GPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder of results.csv, table.md, plots (default {DEFAULT_OUT.relative_to(REPO)}, or "
                         f"{DOCS_OUT.relative_to(REPO)} with --update-docs)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per provider and point (default 5 with --quick, else 20)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls at most (default 5 quick, else 20)")
    ap.add_argument("--only", default=None,
                    help="run only providers whose label contains one of these texts (comma-separated)")
    ap.add_argument("--skip", default=None,
                    help="leave out providers whose label contains one of these texts (comma-separated)")
    ap.add_argument("--note", default="", help="free text stored with the rows and shown in RESULTS.md")
    ap.add_argument("--run-id", default=None,
                    help="the rows' run_id (default: time and device); calls that share one render as one run "
                         "(the GPU suite's goal steps)")
    add_docs_arguments(ap)
    ap.add_argument("--render", type=Path, nargs="+", default=None,
                    help="only re-render outputs from these CSV files (no measurement)")
    ap.add_argument("--run", nargs="+", default=None,
                    help="with --render: render these run_ids, as one run, instead of their device's latest run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, results_md, readme = docs_targets(args)
    if args.render:
        rows = [r for path in args.render for r in res.read_rows(path)]
        if args.run:  # rendered as one run (the first's id), in the order given; other devices' and kinds' rows stay
            named = [dict(r, run_id=args.run[0]) for run in args.run for r in rows if r["run_id"] == run]
            replaced = {(r["device"], r["kind"]) for r in named}
            rows = [r for r in rows if (r["device"], r["kind"]) not in replaced] + named
        render(rows, sorted({r["device"] for r in rows}), out, results_md, readme)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 20.0)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 20)
    command = "python -m benchmarks.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    base = base_columns(args.device, command.strip(), args.note, args.run_id)
    plist = selected_providers(args.only, args.skip)
    csv_path = out / "results.csv"
    estimates, refs = Estimates(enabled=not (args.quick or args.goals)), {}
    points = sweep_points(args.quick, args.goals)
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {point[0]} {point[1]} B={point[2]} N={point[3]} M={point[4]} D={D_MODEL}",
              flush=True)
        rows = run_point(point, plist, device=args.device, dtype=args.dtype, D=D_MODEL, budget=budget,
                         repeats=repeats, estimates=estimates, base=base, refs=refs, skip_slow=not args.quick)
        res.append_rows(csv_path, rows)
    render_after_run(csv_path, args.device, out, results_md, readme)
    return 0


def selected_providers(only: str | None, skip: str | None) -> list:
    """The providers whose label contains one of the comma-separated texts ``only`` (all when None) and none of
    ``skip``'s."""
    def matches(texts: str, label: str) -> bool:
        return any(text in label for text in texts.split(",") if text)

    return [p for p in providers()
            if (only is None or matches(only, p.label)) and not (skip is not None and matches(skip, p.label))]


def render_after_run(csv_path: Path, device: str, out: Path, results_md: Path | None, readme: Path | None) -> None:
    """Say where the rows went, then regenerate the outputs of ``device`` from the whole CSV (``render``)."""
    print(f"appended to {csv_path}")
    render(res.read_rows(csv_path), [device], out, results_md, readme)


if __name__ == "__main__":
    sys.exit(main())
