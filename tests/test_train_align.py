"""The alignment harness end to end: loss, regulariser, exact resume, two-process DDP, the demo's lift."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import otfast
from accelerate import Accelerator

from train.align import alignment_loss, checkpoint_dirs, main, setup
from train.config import load_config
from train.data import batch_indices, load_pairs, prepare_language
from train.modeling import build_tiny_model, encode_words, layer_states, load_encoder

ROOT = Path(__file__).parents[1]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
# Two synthetic language pairs (different word maps), a smaller model with dropout, trained with dropout on
# (so the RNG state matters), gradient accumulation, a few steps.
SMALL = ["--train.dropout", "true","--data.languages", ("[{lang: xx, format: synthetic, n_pairs: 120, seed: 0},"
                              " {lang: yy, format: synthetic, n_pairs: 120, seed: 1, map_seed: 7}]"),
         "--data.pairs_per_language", "64", "--data.eval_pairs", "16", "--train.batch_size", "4",
         "--train.grad_accum", "2", "--train.max_steps", "6", "--train.checkpoint_every", "0",
         "--train.log_every", "1", "--model.tiny.dropout", "0.1", "--model.tiny.hidden_size", "32",
         "--model.tiny.intermediate_size", "64", "--model.tiny.vocab_size", "300"]


def _setup(tmp_path, overrides=()):
    cfg = load_config(TINY, ["--data.pairs_per_language", "64", "--data.eval_pairs", "0", *overrides])
    dataset, report = load_pairs(cfg["data"]["languages"][0])
    lang = prepare_language(dataset, report, pairs_per_language=64)
    path = build_tiny_model([s for p in lang.train for s in p], tmp_path / "init", seed=0, **cfg["model"]["tiny"])
    model, tok = load_encoder(path)
    reference, _ = load_encoder(path)
    reference.eval().requires_grad_(False)
    idx = [batch_indices(64, micro_step=0, batch_size=8, num_processes=1, process_index=0, seed=0)]
    kw = {k: v for k, v in cfg["loss"].items() if k not in ("granularity", "reg_lambda")}
    return cfg, [lang], model.train(), reference, tok, idx, otfast.SinkhornLoss(**kw)


def _loss(setup):
    cfg, langs, model, reference, tok, idx, ot = setup
    return alignment_loss(model, reference, tok, langs, idx, cfg, ot, torch.device("cpu"), contextlib.nullcontext)


def english_drift(model, reference, tok, english: list[list[str]]) -> float:
    """sum ||h - h0||^2 over the words' tokens, one sentence at a time (no padding), both encoders without
    dropout, averaged over the sentences: the regulariser as Cao et al. define it."""
    total, training = 0.0, model.training
    model.eval()
    for words in english:
        batch = encode_words(tok, [words])
        with torch.no_grad():
            h, h0 = layer_states(model, batch), layer_states(reference, batch)
        keep = batch["word_ids"][0] >= 0
        total += ((h[0, keep] - h0[0, keep]) ** 2).sum().item()
    model.train(training)
    return total / len(english)


@pytest.mark.parametrize("granularity", ["sentence", "batch"])
def test_one_step_lowers_the_ot_loss(tmp_path, granularity):
    setup = _setup(tmp_path, ["--loss.granularity", granularity])
    model = setup[2]
    loss, parts = _loss(setup)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    _, after = _loss(setup)
    assert after["ot_xx"] < parts["ot_xx"] - 1e-3 * abs(parts["ot_xx"])


def test_batch_granularity_is_one_problem_over_the_pooled_words(tmp_path):
    setup = _setup(tmp_path, ["--loss.granularity", "batch", "--loss.reg_lambda", "0"])
    _, langs, model, _, tok, idx, _ = setup
    loss, parts = _loss(setup)
    words = {side: [langs[0].train[i][side].split() for i in idx[0]] for side in (0, 1)}
    pooled = {}
    with torch.no_grad():
        for side, sentences in words.items():             # each sentence alone, its last sub-words
            vectors = []
            for sentence in sentences:
                batch = encode_words(tok, [sentence])
                h, ids = layer_states(model, batch)[0], batch["word_ids"][0]
                vectors += [h[(ids == w).nonzero().max()] for w in range(len(sentence))]
            pooled[side] = torch.stack(vectors).double().unsqueeze(0)
    expected = otfast.sinkhorn_loss(pooled[0], pooled[1], blur=0.05, scaling=0.5, backend="torch").item()
    assert parts["ot_xx"] == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_regulariser_is_zero_at_step_zero_and_matches_its_formula_after(tmp_path):
    setup = _setup(tmp_path)
    _, langs, model, reference, tok, idx, _ = setup
    _, parts = _loss(setup)
    assert parts["reg"] == 0.0
    with torch.no_grad():                                  # move the encoder away from h0
        for p in model.encoder.layer[-1].output.dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, parts = _loss(setup)
    expected = english_drift(model, reference, tok, [langs[0].train[i][1].split() for i in idx[0]])
    assert parts["reg"] == pytest.approx(expected, rel=1e-4)
    assert parts["reg"] > 0


@pytest.mark.parametrize("dropout", ["false", "true"])
def test_with_dropout_in_the_model_the_regulariser_is_zero_at_step_zero_and_measures_drift(tmp_path, dropout):
    cfg = load_config(TINY, [*SMALL, "--train.dropout", dropout], output_dir=str(tmp_path))
    run = setup(cfg, Accelerator(cpu=True), tmp_path, ROOT, total=6)
    assert run.model.config.hidden_dropout_prob == run.model.config.attention_probs_dropout_prob == 0.1
    idx = [batch_indices(64, micro_step=0, batch_size=4, num_processes=1, process_index=0, seed=0)] * 2

    def loss():
        return alignment_loss(run.model, run.reference, run.tokenizer, run.languages, idx, cfg, run.ot_loss,
                              torch.device("cpu"), contextlib.nullcontext)[1]

    first, again = loss(), loss()
    assert first["reg"] == again["reg"] == 0.0
    assert (first["ot_xx"] == again["ot_xx"]) == (dropout == "false")       # masks drawn only with dropout on
    run.model.train()                                        # dropout in the trained encoder alone (as before)
    run.reference.eval()
    assert loss()["reg"] > 0                                 # measures dropout noise: the weights are h0's
    if dropout == "false":                                   # drift: the term equals its dropout-free formula
        run.model.eval()
        with torch.no_grad():
            for p in run.model.encoder.layer[-1].output.dense.parameters():
                p.add_(0.02 * torch.randn_like(p))
        english = [run.languages[k].train[i][1].split() for k in range(2) for i in idx[k]]
        expected = english_drift(run.model, run.reference, run.tokenizer, english)
        assert loss()["reg"] == pytest.approx(expected, rel=1e-4) and expected > 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


def test_checkpoint_then_resume_is_bitwise_identical(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["--config", str(TINY), "--output-dir", str(whole), *SMALL]) == 0
    # The same initial model (the tokenizers WordPiece trainer breaks ties differently from one process
    # to the next, so a second fresh build could differ).
    same_init = [*SMALL, "--model.name_or_path", str(whole / "init_model")]
    assert main(["--config", str(TINY), "--output-dir", str(cut), *same_init, "--train.stop_after_steps", "3"]) == 0
    assert not (cut / "model").exists() and (cut / "checkpoints" / "step-3").is_dir()
    assert main(["--config", str(TINY), "--output-dir", str(cut), *same_init]) == 0
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(str(whole / "init_model" / "model.safetensors"))
    assert not torch.equal(a["embeddings.word_embeddings.weight"], init["embeddings.word_embeddings.weight"])
    def curves(folder):                                    # every column but the elapsed seconds
        return [row.rsplit(",", 1)[0] for row in (folder / "metrics.csv").read_text().splitlines()]

    assert curves(whole) == curves(cut)


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """Warm-up over 3 of 6 steps: steps 1-3 use 1/4, 2/4, 3/4 of the peak, steps 4-6 1, 2/3, 1/3 (``lr_lambda``);
    the log used to show the next step's rate (1/2 at step 1, 0 at step 6)."""
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--output-dir", str(out), *SMALL, "--train.warmup_ratio", "0.5"]) == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    expected = [1e-2 * f for f in (1 / 4, 2 / 4, 3 / 4, 1, 2 / 3, 1 / 3)]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected)


def test_a_resume_with_other_settings_stops_naming_them_and_resume_false_starts_over(tmp_path, capsys):
    """The optimiser, scheduler and data position of a checkpoint belong to its settings: a resume with others
    (lr, batch size, the tiny model) used to mix two runs and rewrite run_config.json, and --train.resume false
    reused the earlier init_model."""
    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--output-dir", str(out), *SMALL]
    assert main([*argv, "--train.stop_after_steps", "3"]) == 0
    step3 = out / "checkpoints" / "step-3"
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*argv, "--train.lr", "1.0", "--train.batch_size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {step3} was written with other settings: train.batch_size 4 -> 8, train.lr 0.01 -> "
                          f"1.0; resume with that run's settings ({step3 / 'run_config.json'}; only output_dir, ")
    assert err.count("\n") == 1
    assert main([*argv, "--model.tiny.hidden_size", "48"]) == 2
    assert ": model.tiny.hidden_size 32 -> 48;" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files                # nothing written
    assert main([*argv, "--train.log_every", "2", "--train.checkpoint_every", "1"]) == 0     # they steer this call
    assert f"resumed from {step3} at step 3" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["train"]["log_every"] == 2
    assert [n for n, _ in checkpoint_dirs(out)] == [5, 6]

    assert main([*argv, "--train.resume", "false", "--model.tiny.hidden_size", "48"]) == 0
    printed = capsys.readouterr().out
    assert (f"starting over in {out}: removed the earlier run's model, metrics.json, metrics.csv, tensorboard, "
            "data_report.json, run_config.json, init_model, checkpoints/step-5, checkpoints/step-6\n") in printed
    assert "resumed" not in printed
    for folder in ("init_model", "model"):
        assert json.loads((out / folder / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((out / "run_config.json").read_text())["model"]["tiny"]["hidden_size"] == 48
    assert [n for n, _ in checkpoint_dirs(out)] == [6]
    steps = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]


def test_a_checkpoint_without_its_settings_is_checked_against_the_folders(tmp_path, capsys):
    """Checkpoints written before they held their settings resume against the run_config.json their run wrote
    in the output folder as it started, and other settings still stop the run."""
    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--output-dir", str(out), *SMALL]
    assert main([*argv, "--train.stop_after_steps", "3"]) == 0
    (out / "checkpoints" / "step-3" / "run_config.json").unlink()
    assert main([*argv, "--train.lr", "1.0"]) == 2
    assert "train.lr 0.01 -> 1.0" in capsys.readouterr().err
    assert main(argv) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-3'} at step 3" in capsys.readouterr().out


def test_starting_over_leaves_a_folder_that_holds_no_run_alone(tmp_path, capsys):
    """--train.resume false removes an earlier run's files only where a run claimed the folder (its
    run_config.json, the first thing it writes): in a folder of other things, a model/ and a checkpoints/ of the
    user's own stay; once a run has claimed it, what checkpoints/ holds besides step-N stays too."""
    out = tmp_path / "mine"
    for name in ("model", "checkpoints/old"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text("mine")
    argv = ["--config", str(TINY), "--output-dir", str(out), *SMALL, "--train.resume", "false"]
    assert main(argv) == 0
    assert "starting over" not in capsys.readouterr().out
    assert [(out / name / "notes.txt").read_text() for name in ("model", "checkpoints/old")] == ["mine", "mine"]
    assert main(argv) == 0                                   # now the folder is a run's: its model/ goes
    assert "starting over" in capsys.readouterr().out
    assert (out / "checkpoints" / "old" / "notes.txt").read_text() == "mine"


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_a_changed_rerun_reuses(tmp_path, capsys):
    """A fresh run claims its folder (run_config.json) before it builds init_model: stopped before its first
    checkpoint (here by a model.max_length the tiny model does not take), a rerun with other settings stops
    naming them, and --train.resume false builds the model anew."""
    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--output-dir", str(out), *SMALL]
    assert main([*argv, "--model.max_length", "100000"]) == 2
    assert (out / "init_model").is_dir() and not (out / "checkpoints").exists()
    capsys.readouterr()
    assert main([*argv, "--model.tiny.hidden_size", "48"]) == 2
    assert "model.tiny.hidden_size 32 -> 48" in capsys.readouterr().err
    assert main([*argv, "--model.tiny.hidden_size", "48", "--train.resume", "false"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["hidden_size"] == 48


def test_a_finished_run_without_checkpoints_is_not_replaced_by_a_resume(tmp_path, capsys, monkeypatch):
    """A default resume of a finished run (its checkpoints removed) whose length differs with the same settings
    (another process count: here the step count patched) stops, where it removed the finished model before
    training anything."""
    import train.align

    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--output-dir", str(out), *SMALL]
    assert main(argv) == 0
    shutil.rmtree(out / "checkpoints")
    model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(train.align, "total_steps", lambda cfg, processes: 12)
    assert main(argv) == 2
    assert "holds a finished run of another length" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == model


def test_two_processes_train_identical_replicas(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.align", "--config", str(TINY), "--output-dir", str(out), *SMALL, "--train.cpu", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    digests = metrics["replica_params_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    init = load_file(str(out / "init_model" / "model.safetensors"))
    final = _weights(out)
    assert not torch.equal(final["embeddings.word_embeddings.weight"], init["embeddings.word_embeddings.weight"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--config", str(TINY), "--output-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_lifts_retrieval_from_chance(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["retrieval_before"] < 0.1               # 200 held-out pairs: chance is 0.005
    assert metrics["retrieval_after"] >= 0.8


@pytest.mark.slow
def test_demo_writes_a_transformers_loadable_model_and_logs(demo_run):
    model = AutoModel.from_pretrained(demo_run / "model")
    tok_files = {p.name for p in (demo_run / "model").iterdir()}
    assert "tokenizer.json" in tok_files and "config.json" in tok_files
    assert model.config.hidden_size == 64
    header = (demo_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "loss", "ot_xx", "reg"]
    assert any((demo_run / "tensorboard").iterdir())
    report = json.loads((demo_run / "data_report.json").read_text())
    assert report[0]["train"] == 4000 and report[0]["held_out"] == 200
