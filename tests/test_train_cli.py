"""Failures a user meets first, each one line that says what to do: a hub that cannot be reached (fast, not
after 30 s of retries), a mistyped model folder, an alignment that does not converge; and a finished run
that is run again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import train.evaluate as evaluate
from train import align, hub
from train.data import load_pairs
from train.modeling import build_tiny_model
from train.synthetic import synthetic_pairs

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "train" / "configs"


@pytest.fixture
def no_hub(monkeypatch):
    """The hub at a closed local port (connection refused at once), and no offline mode."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    ds = synthetic_pairs(200, seed=0)
    return str(build_tiny_model(list(ds["source"]) + list(ds["target"]), tmp_path_factory.mktemp("m") / "model",
                                vocab_size=300))


def test_a_hub_data_set_without_network_fails_at_once_naming_the_key(no_hub, tiny_model, capsys):
    assert hub.unreachable() is not None
    started = time.perf_counter()
    code = evaluate.cli(["xnli", "--model", tiny_model, "--config", str(CONFIGS / "eval_xnli_tiny.yaml"),
                         "--data.test", "xnli"])
    assert code == 2 and time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.test: 'xnli' is a data set on the Hugging Face hub, "
                                                   "which cannot be reached (http://127.0.0.1:9: ")
    assert "point data.test (and any other key that names a hub data set) at local files" in err
    with pytest.raises(ConnectionError, match=r"data.languages\[de\]: 'Helsinki-NLP/europarl' .* cannot be reached.*"
                                              r"\{lang: de, format: tsv, path: FILE\}"):
        load_pairs({"lang": "de", "format": "hub", "path": "Helsinki-NLP/europarl", "name": "de-en"})


def test_offline_mode_without_a_cached_copy_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no copy in the Hugging Face cache .*offline mode is set"):
        hub.model_source("otfast-tests/no-such-model")


def test_model_paths_a_hub_name_or_a_mistyped_folder(no_hub, tiny_model, tmp_path):
    assert hub.model_source(tiny_model) == (tiny_model, {})
    with pytest.raises(FileNotFoundError, match=r"^model folder runs/tiny/modle not found$"):
        hub.model_source("runs/tiny/modle")                       # cannot be a hub name: a folder was meant
    with pytest.raises(FileNotFoundError, match=r"'runs/modle': no local folder of that name, and no copy in the "
                                                r"Hugging Face cache while the hub \(http://127.0.0.1:9\) cannot"):
        hub.model_source("runs/modle")                            # could be a hub name: both are said
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hub.model_source(tmp_path / "empty")
    out = tmp_path / "run"
    code = align.main(["--config", str(CONFIGS / "tiny.yaml"), "--output-dir", str(out),
                       "--model.name_or_path", "runs/tiny/modle"])
    assert code == 2


def test_align_converges_with_its_defaults_and_says_so_in_one_line_when_not(tiny_model, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)             # no library warning reaches the user
        res = evaluate.main(["align", "--model", tiny_model, "--synthetic", "40", "--batch-size", "20"])
        assert res["unconverged_batches"] == 0 and capsys.readouterr().err == ""
        res = evaluate.main(["align", "--model", tiny_model, "--synthetic", "40", "--batch-size", "20",
                             "--n-iters", "2", "--tol", "1e-9"])
    assert res["unconverged_batches"] == 2
    assert capsys.readouterr().err == ("align: in 2 of 2 batches some pairs did not reach --tol 1e-09 within "
                                       "--n-iters 2; their links come from a plan that is not fully converged: "
                                       "raise --n-iters (or --tol) if that matters\n")


def test_a_finished_run_run_again_trains_nothing_and_says_it_is_complete(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "tiny.yaml"), "--output-dir", str(out), "--data.pairs_per_language", "32",
            "--data.eval_pairs", "8", "--data.languages", "[{lang: xx, format: synthetic, n_pairs: 60}]",
            "--train.batch_size", "4", "--train.max_steps", "3"]
    assert align.main(argv) == 0
    first = capsys.readouterr().out
    assert "(3 steps, " in first
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert align.main(argv) == 0
    again = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert again == (f"{out} is already complete (3 steps; retrieval {metrics['retrieval_before']:.3f} -> "
                     f"{metrics['retrieval_after']:.3f}); model in {out / 'model'}. Nothing to do: use a new "
                     "--output-dir or --train.resume false to train again\n")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files          # nothing written


def test_a_max_length_above_what_the_model_takes_is_one_error_line(tmp_path, capsys):
    """The tiny model has 64 positions: model.max_length 128 crashed at the first long sentence."""
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "tiny.yaml"), "--output-dir", str(out), "--data.pairs_per_language", "32",
            "--data.eval_pairs", "8", "--data.languages", "[{lang: xx, format: synthetic, n_pairs: 60}]",
            "--train.batch_size", "4", "--train.max_steps", "3", "--model.max_length", "128"]
    assert align.main(argv) == 2
    assert capsys.readouterr().err == (f"error: model.max_length 128 is more than the model ({out / 'init_model'}) "
                                       "takes: 64 tokens; set --model.max_length 64 or less\n")


def _spin_count(args: list[str], policy: str | None = None) -> int:
    """libgomp's spin count (``GOMP_SPINCOUNT``, 0 under the passive policy) as the process's OpenMP runtime
    reports it when it starts (``OMP_DISPLAY_ENV=VERBOSE``)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE"}, **({"OMP_WAIT_POLICY": policy} if policy else {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    if found is None:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp (no GOMP_SPINCOUNT in its OMP_DISPLAY_ENV report)")
    return int(found.group(1))


def test_the_entry_points_make_waiting_openmp_threads_sleep_unless_the_environment_says_otherwise():
    assert _spin_count(["-m", "train.align", "--help"]) == 0
    assert _spin_count(["-c", "import train, torch"], policy="ACTIVE") > 300_000
    assert _spin_count(["-c", "import torch, train; assert train.OPENMP_SPINS"]) > 0   # too late: it spins


def test_threads_that_spin_are_pointed_out(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(align, "OPENMP_SPINS", True)
    threads = torch.get_num_threads()
    try:
        assert align.main(["--config", str(CONFIGS / "tiny.yaml"), "--output-dir", str(tmp_path),
                           "--train.num_threads", "2", "--train.max_steps", "0"]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "note: torch was imported before train, with no OMP_WAIT_POLICY: its 2 threads spin" in err
    assert err.splitlines()[-1].startswith("error: no optimizer step to run")
