"""The benchmark machinery (``benchmarks/``): CSV schema, tables and plot from a CSV, RESULTS.md and README
rewriting, the exponential count, and the value check that flags a wrong provider. All small and fast:
nothing here measures speed."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import results as res
from benchmarks.providers import SETTINGS, Provider, check, make_inputs, providers, reference
from benchmarks.report import Estimates, render, run_point

BASE = dict(run_id="r1", timestamp="2026-01-01 00:00 UTC", kind="sweep", setting="fixed", mode="fwd+bwd", B=32,
            N=40, M=40, D=768, dtype="fp32", device="cpu", device_name="test cpu", versions="torch=x",
            commit="abc1234", command="python -m benchmarks.report --quick")


def row(provider: str, backend: str, p50: float | None, status: str = "ok", **kw) -> dict:
    out = dict(BASE, provider=provider, backend=backend, status=status, detail=kw.pop("detail", ""))
    if p50 is not None:
        out.update(p20_ms=0.9 * p50, p50_ms=p50, p80_ms=1.1 * p50, repeats=5)
    out.update(kw)
    return out


def sample_rows() -> list[dict]:
    rows = [row("otfast", "torch", 2.0), row("pot-solve_batch", "torch", 10.0), row("geomloss", "tensorized", 40.0),
            row("torch-unrolled", "autograd", None, status="mismatch", detail="value rel. err 1e-02 > 2e-03"),
            row("flash-sinkhorn", "triton", None, status="skipped", detail="runs on cuda only")]
    res.speedups(rows)
    return rows


def through_csv(rows: list[dict], folder) -> list[dict]:
    """The rows as the renderers see them: written to and read back from a CSV."""
    path = folder / "through.csv"
    res.append_rows(path, rows)
    return res.read_rows(path)


def test_csv_roundtrip_keeps_the_schema(tmp_path):
    path = tmp_path / "results.csv"
    res.append_rows(path, sample_rows())
    res.append_rows(path, sample_rows()[:1])
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == res.SCHEMA
    rows = res.read_rows(path)
    assert len(rows) == 6
    assert rows[0]["provider"] == "otfast" and float(rows[0]["p50_ms"]) == 2.0
    assert rows[3]["status"] == "mismatch" and rows[3]["p50_ms"] == ""


def test_csv_rejects_foreign_header_unknown_column_and_bad_status(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("provider,time\nx,1\n")
    with pytest.raises(ValueError, match="expected"):
        res.append_rows(path, sample_rows())
    with pytest.raises(ValueError, match="expected"):
        res.read_rows(path)
    with pytest.raises(ValueError, match="outside the schema"):
        res.append_rows(tmp_path / "new.csv", [dict(row("otfast", "torch", 1.0), speed=3)])
    with pytest.raises(ValueError, match="status"):
        res.append_rows(tmp_path / "new.csv", [row("otfast", "torch", 1.0, status="fast")])


def test_speedups_are_ratios_of_p50_over_checked_rows():
    rows = {res.label(r): r for r in sample_rows()}
    assert rows["otfast[torch]"]["speedup_vs_pot"] == pytest.approx(5.0)
    assert rows["otfast[torch]"]["speedup_vs_geomloss"] == pytest.approx(20.0)
    assert rows["pot-solve_batch[torch]"]["speedup_vs_pot"] == pytest.approx(1.0)
    assert rows["torch-unrolled[autograd]"]["speedup_vs_pot"] is None


def test_markdown_table_from_csv(tmp_path):
    path = tmp_path / "results.csv"
    res.append_rows(path, sample_rows())
    table = res.markdown_table(res.read_rows(path))
    lines = table.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "flash-sinkhorn[triton]" not in head  # skipped everywhere: no column
    cells = dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert cells["otfast[torch]"] == "2.00"
    assert cells["pot-solve_batch[torch]"] == "10.0"
    assert cells["torch-unrolled[autograd]"] == "wrong"
    assert cells["otfast vs POT"] == "5.0x" and cells["otfast vs GeomLoss"] == "20.0x"
    assert "runs on cuda only" in res.notes(res.read_rows(path))
    headline = res.headline(res.read_rows(path), 32, 40, 40, 768)
    assert "WRONG" in headline and "flash-sinkhorn" not in headline


def test_memory_table_has_no_time_ratios(tmp_path):
    """The peak-memory table of a GPU section shows MiB per provider and no speed-up columns: those are ratios of
    times (they printed 5.0x / 20.0x next to MiB)."""
    from benchmarks.report import device_section

    mem = (100.0, 50.0, 80.0, None, None)
    rows = through_csv([dict(r, device="cuda", peak_mem_mb=m) for r, m in zip(sample_rows(), mem)], tmp_path)
    section = device_section(rows, [], tmp_path / "no.png", tmp_path)
    table = section[section.index("### Peak extra memory"):].split("\n\n")[1].splitlines()
    assert "vs POT" not in table[0] and "vs GeomLoss" not in table[0]
    assert table[2] == "| fixed | fwd+bwd | 32 | 40 | 40 | 768 | fp32 | 100 | 50.0 | 80.0 | wrong |"


def gpu_suite_rows() -> list[dict]:
    """One GPU run in two calls sharing its run_id, as the suite's goal steps write them: POT, GeomLoss and
    ``otfast[triton]`` in one (its speed-ups filled there), ``otfast[triton-exact]``, faster, in another."""
    gpu = dict(run_id="suite", device="cuda", device_name="test gpu", setting="fixed", mode="fwd+bwd", B=64, N=128,
               M=128)
    first = [row("pot-solve_batch", "torch", 24.8, **gpu), row("geomloss", "tensorized", 43.6, **gpu),
             row("otfast", "triton", 3.12, **gpu)]
    res.speedups(first)
    second = [row("otfast", "triton-exact", 2.84, **gpu, command="python -m benchmarks.report --only triton-")]
    res.speedups(second)
    return first + second


def test_speedups_come_from_the_cells_shown_whichever_call_measured_them(tmp_path):
    """A line merged from several calls of one run: its best otfast is the fastest otfast cell shown (2.84 ms,
    measured by another call than POT's and GeomLoss's), not the best of the ratios each call wrote (8.0x)."""
    rows = through_csv(gpu_suite_rows(), tmp_path)
    assert rows[-1]["speedup_vs_pot"] == ""  # its call had no POT row
    line = res.markdown_table(rows).strip().splitlines()[2]
    assert line.endswith("| 2.84 | 8.7x | 15.4x |")
    headline = res.headline(rows, 64, 128, 128, 768)
    assert "`otfast[triton-exact]` | 2.84 (2.56-3.12) | 8.7x | 15.4x |" in headline
    assert "`otfast[triton]` | 3.12 (2.81-3.43) | 7.9x | 14.0x |" in headline


def test_a_cell_measured_twice_shows_the_later_measurement_and_says_so(tmp_path):
    """The suite's sweep step shares the goal steps' run_id and repeats three of their points: each such cell
    shows the latest row, the README table and RESULTS.md say how many cells were measured again, and the
    tables refuse rows with two measurements of one cell instead of keeping one silently."""
    rows = gpu_suite_rows()
    again = [dict(r, p50_ms=2 * r["p50_ms"], command="python -m benchmarks.report --budget 1") for r in rows[:2]]
    rows = through_csv(rows + again, tmp_path)
    with pytest.raises(ValueError, match=r"pot-solve_batch\[torch\] has two rows"):
        res.markdown_table(rows)
    with pytest.raises(ValueError, match="two rows"):
        res.headline(rows, 64, 128, 128, 768)
    kept, again = res.one_per_cell(rows + [dict(rows[-1])])     # a third measurement of one cell is one cell
    assert len(again) == 2 and [res.label(r) for r in kept] == [res.label(r) for r in rows[:4]]
    assert [r["p50_ms"] for r in kept[:2]] == ["49.6", "87.2"]
    kept, again = res.one_per_cell(rows)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    render(rows, ["cuda"], tmp_path / "out", tmp_path / "RESULTS.md", readme, log=lambda *_: None)
    said = "2 cells measured more than once in this run: each shows the latest"
    assert said in readme.read_text() and said in (tmp_path / "RESULTS.md").read_text()
    assert readme.read_text().count("| 49.6 | 87.2 | 3.12 | 2.84 | 17.5x | 30.7x |") == 1


def test_a_run_of_several_calls_lists_every_command_it_shows(tmp_path):
    """The README table and the RESULTS.md section of a run merged from several calls name each call's command
    (they named the first row's only); the README table names those of its forward+backward lines only."""
    forward = row("otfast", "torch", 5.0, run_id="suite", device="cuda", device_name="test gpu", mode="forward",
                  command="python -m benchmarks.report --forward-only")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    render(through_csv(gpu_suite_rows() + [forward], tmp_path), ["cuda"], tmp_path / "out", tmp_path / "RESULTS.md",
           readme, log=lambda *_: None)
    commands = "`python -m benchmarks.report --quick`, `python -m benchmarks.report --only triton-`"
    assert f"; commands: {commands})" in readme.read_text()
    results = (tmp_path / "RESULTS.md").read_text()
    assert f"Commands: {commands}, `python -m benchmarks.report --forward-only`\n" in results
    assert "commit: `abc1234`;" in readme.read_text() and "Commit: `abc1234`, " in results


def test_headline_says_when_a_gradient_was_not_checked(tmp_path):
    """An unrolled provider in the paper setting passes on its value only (its gradient differs by design): its
    check says so instead of "ok" next to a 100% gradient error."""
    paper = dict(setting="paper", value_err=4e-6)
    rows = through_csv([row("otfast", "torch", 2.0, **paper, grad_err=3e-8),
                        row("torch-unrolled", "autograd", 5.0, **paper, grad_err=1.0,
                            detail="gradient not checked (unrolled)")], tmp_path)
    headline = res.headline(rows, 32, 40, 40, 768)
    assert "| value ok, gradient not checked (4e-06 / 1e+00) |" in headline
    assert "| ok (4e-06 / 3e-08) |" in headline


def test_plot_is_a_png(tmp_path):
    rows = sample_rows() + [dict(r, B=8, N=16, M=16) for r in sample_rows()]
    path = tmp_path / "plot.png"
    res.plot(through_csv(rows, tmp_path), path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_md_update_keeps_the_other_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    res.update_results(path, "cpu", "CPU body one")
    assert res.NO_GPU in path.read_text()
    res.update_results(path, "cuda", "GPU body")
    res.update_results(path, "cpu", "CPU body two")
    text = path.read_text()
    assert "GPU body" in text and "CPU body two" in text and "CPU body one" not in text
    assert res.NO_GPU not in text


def test_readme_rewrites_only_between_markers_and_keeps_the_other_devices_table(tmp_path):
    """Each device's table sits between markers of its own: rewriting one keeps the other's; a block without
    them (a README from before them) is rewritten only when every device's table is given, else refused."""
    path = tmp_path / "README.md"
    path.write_text("# title\nbefore\n<!-- bench-table:start -->\n<!-- bench-table:end -->\nafter\n")
    res.update_readme(path, {"cpu": "| cpu | table |"})
    assert path.read_text() == ("# title\nbefore\n<!-- bench-table:start -->\n"
                                "<!-- bench-table:cpu:start -->\n| cpu | table |\n<!-- bench-table:cpu:end -->\n\n"
                                "<!-- bench-table:cuda:start -->\n_No GPU run yet._\n<!-- bench-table:cuda:end -->\n\n"
                                f"{res.README_FOOTER}\n<!-- bench-table:end -->\nafter\n")
    res.update_readme(path, {"cuda": "| gpu | table |"})
    res.update_readme(path, {"cpu": "| cpu | again |"})
    text = path.read_text()
    assert "| gpu | table |" in text and "| cpu | again |" in text and "| cpu | table |" not in text
    assert text.startswith("# title\nbefore\n") and text.endswith("<!-- bench-table:end -->\nafter\n")
    path.write_text("<!-- bench-table:start -->\n**CPU** old\n\n**GPU** old\n<!-- bench-table:end -->\n")
    with pytest.raises(ValueError, match="GPU table, which would be lost"):
        res.update_readme(path, {"cpu": "| cpu | table |"})
    assert "**GPU** old" in path.read_text()
    res.update_readme(path, {"cpu": "| cpu | table |", "cuda": "| gpu | table |"})
    assert "old" not in path.read_text() and "| gpu | table |" in path.read_text()
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        res.update_readme(path, {"cpu": "x"})


def test_update_docs_on_one_device_keeps_the_other_devices_table_and_section(tmp_path):
    """A CPU run with ``--update-docs`` on a CSV without GPU rows, and ``--render`` of a GPU suite's CSV, each
    rewrite their device's README table and RESULTS.md section and keep the other device's (the README table
    was rebuilt from the CSV alone, so each deleted the other's)."""
    from benchmarks.report import main, render_after_run

    readme, results = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text("intro\n<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    cpu_csv, gpu_csv = tmp_path / "cpu.csv", tmp_path / "gpu.csv"
    res.append_rows(cpu_csv, sample_rows())
    res.append_rows(gpu_csv, gpu_suite_rows())
    docs = ["--update-docs", "--results", str(results), "--readme", str(readme)]
    main(["--render", str(cpu_csv), str(gpu_csv), "--out", str(tmp_path / "both"), *docs])
    render_after_run(cpu_csv, "cpu", tmp_path / "cpu", results, readme)  # how a CPU run with --update-docs ends
    after_cpu = readme.read_text(), results.read_text()
    main(["--render", str(gpu_csv), "--out", str(tmp_path / "gpu"), *docs])
    for text in (*after_cpu, readme.read_text(), results.read_text()):
        assert "test cpu" in text and "| 2.00 |" in text
        assert "test gpu" in text and "| 2.84 |" in text


def test_render_writes_table_plot_results_and_readme(tmp_path):
    rows = through_csv(sample_rows(), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    render(rows, ["cpu"], tmp_path / "out", tmp_path / "RESULTS.md", readme, log=lambda *_: None)
    assert (tmp_path / "out" / "plot-cpu.png").exists()
    assert "| 2.00 |" in (tmp_path / "out" / "table.md").read_text()
    results = (tmp_path / "RESULTS.md").read_text()
    assert "test cpu" in results and "python -m benchmarks.report --quick" in results and res.NO_GPU in results
    assert "| 2.00 |" in readme.read_text()


def test_render_merges_the_runs_named_and_keeps_other_devices(tmp_path, capsys):
    """``--render CSV --run A B``: the GPU suite's goal steps (one run each, before ``--run-id``) render as one
    run, each provider's column filled from its own run; the other devices' latest runs stay in the table, and
    the device's latest run of another kind (the encoder step) in its section. Without ``--run``, the latest run
    alone, and the command says so."""
    from benchmarks.report import main

    gpu = dict(device="cuda", device_name="test gpu")
    rows = sample_rows() + [row("otfast", "triton", 3.0, run_id="g1", **gpu), row("geomloss", "tensorized", 12.0,
                                                                                  run_id="g1", **gpu),
                            row("flash-sinkhorn", "triton", 150.0, run_id="g2", **gpu),
                            row("bert-tiny", "otfast:triton", 42.0, run_id="s1", kind="step", mode="ot", **gpu)]
    path = tmp_path / "results.csv"
    res.append_rows(path, rows)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("<!-- results:cpu:start -->\n<!-- results:cpu:end -->\n"
                       "<!-- results:cuda:start -->\n<!-- results:cuda:end -->\n")
    main(["--render", str(path), "--run", "g1", "g2", "--update-docs", "--out", str(tmp_path / "out"),
          "--results", str(results), "--readme", str(readme)])
    table = (tmp_path / "out" / "table.md").read_text()
    gpu_table = table[table.index("test gpu"):]
    assert "| 3.00 |" in gpu_table and "| 12.0 |" in gpu_table and "| 150 |" in gpu_table
    assert "test cpu" in table and "| 2.00 |" in table[:table.index("test gpu")]
    gpu_section = results.read_text()[results.read_text().index("<!-- results:cuda:start -->"):]
    assert "| `otfast:triton` | 42.0 (37.8-46.2) |" in gpu_section
    main(["--render", str(path), "--update-docs", "--out", str(tmp_path / "latest"), "--results", str(results),
          "--readme", str(readme)])
    assert "| 3.00 |" not in (tmp_path / "latest" / "table.md").read_text()  # alone, the latest run is g2's
    assert "cuda: run g2 only, the latest of 2 (--render CSV --run ID" in capsys.readouterr().out


def test_exponential_count_by_hand():
    fixed, paper = SETTINGS["fixed"], SETTINGS["paper"]
    # fixed: 2 N M per update (rows and columns); 102 updates; backward one more plan recomputation
    assert fixed.exponentials(2, 3, 4, 102, backward=False) == 2 * 102 * (2 * 3 * 4)
    assert fixed.exponentials(2, 3, 4, 102, backward=True) == 2 * 103 * 24
    # paper (debiased): plus N^2 and M^2 per update for OT(a, a) and OT(b, b)
    assert paper.exponentials(2, 3, 4, 14, backward=True) == 2 * 15 * (24 + 9 + 16)


def test_eps_list_is_geomloss_schedule():
    from geomloss._legacy.sinkhorn_divergence import scaling_parameters

    x, y = make_inputs(3, 5, 6, 16)
    _, _, expected, _ = scaling_parameters(x, y, 2, math.sqrt(SETTINGS["paper"].eps), None, None, 0.5)
    assert SETTINGS["paper"].eps_list(x, y) == pytest.approx(expected, rel=1e-6)
    assert SETTINGS["fixed"].eps_list(x, y) == [0.05] * 100


def test_check_flags_wrong_values_and_wrong_gradients():
    x, y = make_inputs(2, 5, 6, 8)
    s = SETTINGS["fixed"]
    ref = reference(x, y, s, backward=True)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    good = providers()[0].values(xg, yg, s)
    grads = torch.autograd.grad(good.sum(), (xg, yg))
    assert check(good, grads, ref).ok
    assert not check(good * 1.01, grads, ref).ok
    assert "value" in check(good * 1.01, grads, ref).detail
    bad_grads = (grads[0] * 1.5, grads[1])
    verdict = check(good, bad_grads, ref)
    assert not verdict.ok and "grad" in verdict.detail
    assert check(good, bad_grads, ref, check_grad=False).ok
    assert not check(good * float("nan"), None, ref).ok


def _otfast_torch(x, y, s):
    return next(p for p in providers() if p.label == "otfast[torch]").values(x, y, s)


def test_run_point_records_a_wrong_provider_as_wrong_not_fast():
    wrong = Provider("wrong", "test", lambda x, y, s: _otfast_torch(x, y, s) * 1.05, ("cpu",), None,
                     lambda *a: 0.0)
    right = Provider("otfast", "torch", _otfast_torch, ("cpu",), None, lambda *a: 0.0)
    absent = Provider("absent", "test", _otfast_torch, ("cuda",), None, lambda *a: 0.0)
    rows = run_point(("fixed", "fwd+bwd", 2, 5, 6), [wrong, right, absent], device="cpu", dtype="fp32", D=8,
                     budget=1.0, repeats=2, estimates=Estimates(), base=dict(BASE), log=lambda *_: None)
    by = {res.label(r): r for r in rows}
    assert by["wrong[test]"]["status"] == "mismatch" and "p50_ms" not in by["wrong[test]"]
    assert by["wrong[test]"]["value_err"] == pytest.approx(0.05, rel=1e-3)
    assert by["otfast[torch]"]["status"] == "ok" and by["otfast[torch]"]["p50_ms"] > 0
    assert by["absent[test]"]["status"] == "skipped" and "cuda" in by["absent[test]"]["detail"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_cpu_provider_agrees_with_the_reference(setting):
    """Wiring of POT, GeomLoss and the unrolled loop: on a tiny batch each matches otfast's float64 reference."""
    s = SETTINGS[setting]
    x, y = make_inputs(2, 5, 6, 8, dtype=torch.float64)
    ref = reference(x, y, s, backward=True)
    ran = []
    for p in providers():
        if p.skip_reason("cpu", s):
            continue
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        values = p.values(xg, yg, s)
        grads = torch.autograd.grad(values.sum(), (xg, yg))
        verdict = check(values, grads, ref, check_grad=p.gradient == "envelope" or s.scaling is None,
                        tolerances={"value": 1e-6, "grad": 1e-4})
        assert verdict.ok, f"{p.label}: {verdict.detail}"
        ran.append(p.name)
    assert {"otfast", "geomloss", "torch-unrolled"} <= set(ran)
    if setting == "fixed":
        assert {"pot-solve_batch", "pot-sinkhorn_log"} <= set(ran)


def test_only_and_skip_select_providers_by_label():
    """``--only`` keeps the providers whose label contains one of the comma-separated texts, ``--skip`` leaves them
    out: the GPU suite times the streaming kernels without the row split (``otfast[triton-nosplit]``), without
    the absorbed cost (``otfast[triton-exact]``) and in place of the 64 tile (``otfast[triton-tile32]``) in a
    step of their own that way (``triton-``), flash-sinkhorn in another, and the others without them."""
    from benchmarks.report import selected_providers

    labels = [p.label for p in providers()]
    variants = ["otfast[triton-nosplit]", "otfast[triton-exact]", "otfast[triton-tile32]"]
    assert set(variants) <= set(labels) and "otfast[triton]" in labels
    assert [p.label for p in selected_providers("triton-nosplit", None)] == ["otfast[triton-nosplit]"]
    assert [p.label for p in selected_providers("triton-", None)] == variants
    assert [p.label for p in selected_providers(None, "triton-")] == [x for x in labels if x not in variants]
    assert [p.label for p in selected_providers(None, None)] == labels
    flash = [x for x in labels if "flash" in x]
    assert flash and [p.label for p in selected_providers(None, "triton-,flash")] == [
        x for x in labels if x not in variants + flash]
    assert [p.label for p in selected_providers("triton-nosplit,flash", None)] == ["otfast[triton-nosplit]"] + flash


def test_the_exact_provider_turns_the_absorbed_cost_off(monkeypatch):
    """``otfast[triton-exact]`` runs ``otfast[triton]`` with ``OTFAST_TRITON_STREAM=cost`` (the packed cost
    without the absorbed one: ``tests/test_triton_interpreter.py`` checks what that does), and leaves the
    environment as it was."""
    from benchmarks import providers as module
    from otfast import triton_backend

    seen = []
    monkeypatch.setattr(module, "_otfast", lambda backend: lambda x, y, s: seen.append((
        backend, triton_backend.stream_source(1, [(64, 64)], torch.device("cpu")))))
    monkeypatch.delenv("OTFAST_TRITON_STREAM", raising=False)
    module._otfast_exact(None, None, None)
    assert seen == [("triton", "cost")] and "OTFAST_TRITON_STREAM" not in os.environ
    assert triton_backend.stream_source(1, [(64, 64)], torch.device("cpu")) == "absorbed"


def test_the_tile32_provider_streams_what_the_64_tile_holds(monkeypatch):
    """``otfast[triton-tile32]`` runs ``otfast[triton]`` with ``OTFAST_TRITON_RESIDENT=32`` (pairs of 33 to 64
    tokens streamed) and leaves the environment as it was; it runs only where that changes the kernels: at those
    lengths, with a triton that ships the 64 tile."""
    from benchmarks import providers as module
    from otfast import triton_backend

    seen = []
    monkeypatch.setattr(module, "_otfast", lambda backend: lambda x, y, s: seen.append((
        backend, triton_backend.resident_side())))
    monkeypatch.delenv("OTFAST_TRITON_RESIDENT", raising=False)
    module._otfast_tile32(None, None, None)
    assert seen == [("triton", 32)] and "OTFAST_TRITON_RESIDENT" not in os.environ
    (tile32,) = [p for p in providers() if p.label == "otfast[triton-tile32]"]
    monkeypatch.setattr(module, "RESIDENT_MAX", 64)
    lengths = [(32, 32), (33, 20), (20, 48), (64, 64), (65, 10), (128, 128)]
    assert [tile32.sizes(n, m) is None for n, m in lengths] == [False, True, True, True, False, False]
    monkeypatch.setattr(module, "RESIDENT_MAX", 32)
    assert "triton >= 3.7" in tile32.sizes(48, 48)


def test_documents_change_only_with_update_docs(tmp_path):
    """Without --update-docs the results go to an untracked folder and no document is named; with it, the
    tracked results folder, RESULTS.md and the README are the targets."""
    from benchmarks.report import DEFAULT_OUT, DOCS_OUT, REPO, docs_targets, parse_args

    assert docs_targets(parse_args(["--quick"])) == (DEFAULT_OUT, None, None)
    assert DEFAULT_OUT.relative_to(REPO).parts[0] == "runs"  # ignored by git (.gitignore)
    assert docs_targets(parse_args(["--quick", "--out", str(tmp_path)])) == (tmp_path, None, None)
    out, results_md, readme = docs_targets(parse_args(["--quick", "--update-docs"]))
    assert (out, results_md, readme) == (DOCS_OUT, REPO / "benchmarks" / "RESULTS.md", REPO / "README.md")


def test_step_ot_share_and_its_noise_band():
    """The share is (with - without) / with from the medians; a band reaching below 0 is flagged as noise."""
    from benchmarks.step import ot_shares

    rows = [dict(p20_ms=95.0, p50_ms=100.0, p80_ms=105.0), dict(p20_ms=120.0, p50_ms=125.0, p80_ms=130.0),
            dict(p20_ms=90.0, p50_ms=98.0, p80_ms=110.0)]
    ot_shares(rows)
    assert rows[1]["ot_share"] == pytest.approx(0.2) and "within noise" not in rows[1]["detail"]
    assert rows[2]["ot_share"] < 0 and rows[2]["detail"].endswith("(within noise)")


def test_step_benchmark_calls_the_harness_loss(monkeypatch):
    """The step is train.align.alignment_loss itself, not a copy: replacing it changes what the step runs."""
    import train.align
    from benchmarks.step import AlignmentStep, long_pairs

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[6])  # the OT term it was given
        return torch.zeros((), requires_grad=True), {}

    monkeypatch.setattr(train.align, "alignment_loss", spy)
    model = torch.nn.Linear(2, 2)
    step = AlignmentStep(model, tokenizer=None, pairs=long_pairs(2, 16), max_tokens=16)
    step("the OT term")
    assert calls == ["the OT term"]


def test_step_benchmark_skips_geomloss_where_it_is_missing(monkeypatch):
    """Without GeomLoss (a GPU image that lacks it) the step is timed with the other OT terms, and the log says
    why GeomLoss is not among them; with it, it is."""
    import sys

    from benchmarks.step import ot_terms

    pytest.importorskip("geomloss")
    assert list(ot_terms("cpu", log=print))[-1] == "geomloss:tensorized"
    monkeypatch.setitem(sys.modules, "geomloss", None)
    said = []
    terms = ot_terms("cpu", log=said.append)
    assert list(terms)[0] == "-" and "otfast:torch" in terms and "geomloss:tensorized" not in terms
    assert len(said) == 1 and "geomloss:tensorized skipped (cannot import geomloss" in said[0], said


def test_harness_rate_leaves_out_the_steps_before_the_first_log(tmp_path):
    """The harness's steps per second run from the first logged step to the last (metrics.csv), so that the JIT
    compiles of a GPU's first steps do not count; nan where fewer than two steps were logged."""
    from benchmarks.harness_gpu import steady_rate

    rows = ["step,loss,elapsed", "20,3.0,10.5", "40,2.0,11.5", "400,1.0,29.5"]  # 10 s of compiles in the first 20
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert steady_rate(tmp_path) == pytest.approx(380 / 19.0)
    (tmp_path / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")
    assert math.isnan(steady_rate(tmp_path))


def test_pot_loads_its_torch_backend_only():
    """The providers turn POT's JAX, CuPy and TensorFlow backends off before POT is imported: JAX would take 75%
    of the GPU's memory at POT's import, and the memory check would skip the large points."""
    import json
    import subprocess
    import sys

    pytest.importorskip("ot")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POT_BACKEND_DISABLE")}
    code = ("import benchmarks.providers as p, json, os, ot; print(json.dumps([os.environ[k] for k in "
            "p.POT_BACKENDS_OFF])); print(json.dumps([type(b).__name__ for b in ot.backend.get_backend_list()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.splitlines()
    assert json.loads(out[0]) == ["1", "1", "1"]
    assert not {"JaxBackend", "CupyBackend", "TensorflowBackend"} & set(json.loads(out[1]))


def test_breakdown_fits_the_time_of_one_update():
    """``per_update``: the line through (updates, ms) points, and a clear error for one count twice."""
    from benchmarks.breakdown import per_update

    slope, intercept = per_update(3.0 + 0.02 * 102, 102, 3.0 + 0.02 * 27, 27)
    assert math.isclose(slope, 0.02) and math.isclose(intercept, 3.0)
    with pytest.raises(ValueError, match="two different update counts"):
        per_update(1.0, 10, 2.0, 10)


def test_breakdown_cli_writes_each_point_it_measured(tmp_path, capsys):
    """``python -m benchmarks.breakdown`` on the torch backend: per point, the kernels of the forward (and of
    the backward for fwd+bwd), the fixed setting's two update counts (102 and 27 of its 100 and 25
    iterations) with their fit, the annealed one's bound, and the batch ratios at B / 4 and 4 B; a bad point
    is refused with its reason."""
    from benchmarks.breakdown import main, per_update

    out = tmp_path / "breakdown.json"
    assert main(["--device", "cpu", "--backend", "torch", "--point", "fixed,fwd+bwd,4,6,5", "--point",
                 "paper,forward,2,5,6", "--dim", "4", "--repeats", "1", "--json", str(out)]) == 0
    fixed, paper = json.loads(out.read_text())
    assert (fixed["setting"], fixed["B"], fixed["N"], fixed["M"], fixed["D"]) == ("fixed", 4, 6, 5, 4)
    assert set(fixed["forward_kernels_ms"]) == set(fixed["backward_kernels_ms"]) == {"torch"}
    assert (fixed["updates"], fixed["updates_fewer"]) == (102, 27)
    slope, intercept = per_update(fixed["forward_ms"], 102, fixed["forward_ms_fewer"], 27)
    assert math.isclose(fixed["update_us"], slope * 1e3) and math.isclose(fixed["once_ms"], intercept)
    assert set(fixed["batch_ratio"]) == {"1", "16"} and all(r > 0 for r in fixed["batch_ratio"].values())
    assert "backward_kernels_ms" not in paper and "update_us" not in paper and set(paper["batch_ratio"]) == {"8"}
    assert math.isclose(paper["update_us_at_most"], paper["forward_ms"] / paper["updates"] * 1e3)
    assert "us per update" in capsys.readouterr().out
    for bad, reason in (("fixed,fwd+bwd,4,6", "SETTING,MODE,B,N,M"), ("fixed,both,4,6,5", "MODE forward"),
                        ("fixed,forward,4,0,5", "at least 1"), ("fixed,forward,4,x,5", "are integers")):
        with pytest.raises(SystemExit):
            main(["--device", "cpu", "--point", bad])
        assert reason in capsys.readouterr().err
