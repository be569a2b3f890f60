"""Fault injection on the alignment harness (issue 15), on CPU with a tiny model and a few steps.

Each fault is made on purpose: a signal mid-epoch (SIGTERM / SIGINT, then a second one), a SIGKILL in the
middle of writing a checkpoint, a damaged newest checkpoint (each file, each way seen in practice), stray
folders next to the checkpoints, and a corpus with 1 % poisoned lines of every kind. The promise checked:
the same command afterwards ends with parameters bitwise equal to those of an uninterrupted run (the
reference), with no step logged twice; or, where nothing usable is left, stops with one clear line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import align
from train.align import checkpoint_dirs, main
from train.modeling import encode_words, load_tokenizer
from train.synthetic import synthetic_pairs

ROOT = Path(__file__).parents[1]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
# Two synthetic language pairs, dropout on (the RNG state matters), accumulation 2 (a signal can land
# between micro-batches), checkpoints every 2 of 6 steps.
SMALL = ["--data.languages", ("[{lang: xx, format: synthetic, n_pairs: 120, seed: 0},"
                              " {lang: yy, format: synthetic, n_pairs: 120, seed: 1, map_seed: 7}]"),
         "--data.pairs_per_language", "64", "--data.eval_pairs", "16", "--train.batch_size", "4",
         "--train.grad_accum", "2", "--train.max_steps", "6", "--train.checkpoint_every", "2",
         "--train.log_every", "1", "--model.tiny.dropout", "0.1", "--model.tiny.hidden_size", "32",
         "--model.tiny.intermediate_size", "64", "--model.tiny.vocab_size", "300"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (it also builds the initial model every other run starts from)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["--config", str(TINY), "--output-dir", str(out), *SMALL]) == 0
    return out


def _args(reference: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--output-dir", str(out), *SMALL,
            "--model.name_or_path", str(reference / "init_model"), *extra]


@pytest.fixture(scope="module")
def cut(reference, tmp_path_factory) -> Path:
    """A run stopped on purpose after 4 of 6 steps: checkpoints step-2 and step-4."""
    out = tmp_path_factory.mktemp("cut")
    assert main(_args(reference, out, "--train.stop_after_steps", "4")) == 0
    assert [n for n, _ in checkpoint_dirs(out)] == [2, 4]
    return out


def _curves(folder: Path) -> list[str]:
    """metrics.csv without its last column (wall-clock seconds); every step once, in order."""
    rows = [row.rsplit(",", 1)[0] for row in (folder / "metrics.csv").read_text().splitlines()]
    steps = [int(r.split(",", 1)[0]) for r in rows[1:]]
    assert steps == sorted(set(steps)), f"a step is logged twice or out of order: {steps}"
    return rows


def _assert_ends_like(out: Path, reference: Path) -> None:
    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curves(out) == _curves(reference)
    assert json.loads((out / "metrics.json").read_text())["params_sha256"] == \
        json.loads((reference / "metrics.json").read_text())["params_sha256"]


def _hook_losses(monkeypatch, at: dict[int, object]) -> None:
    """Run ``at[k]()`` just before the k-th micro-batch loss (1-based) of this invocation."""
    real, calls = align.alignment_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] in at:
            at[calls[0]]()
        return real(*args, **kwargs)

    monkeypatch.setattr(align, "alignment_loss", loss)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_saves_at_the_step_boundary_and_the_same_command_ends_bitwise(
        reference, tmp_path, monkeypatch, capfd, sig):
    out = tmp_path / "run"                           # capfd: the handler writes to fd 2 directly
    before = signal.getsignal(sig)
    kill = lambda: os.kill(os.getpid(), sig)                               # noqa: E731
    # Inside step 3 (2 micro-batches a step); the same signal again at once, as a launcher forwards it.
    _hook_losses(monkeypatch, {5: kill, 6: kill})
    assert main(_args(reference, out)) == 128 + sig
    err = capfd.readouterr().err
    assert f"{sig.name} received: saving a checkpoint after this step" in err
    assert f"stopped by {sig.name} at step 3 of 6; checkpoint {out / 'checkpoints'}/step-3;" in err
    assert "Traceback" not in err
    assert signal.getsignal(sig) is before                                  # handlers restored
    assert [n for n, _ in checkpoint_dirs(out)] == [2, 3] and not (out / "model").exists()
    monkeypatch.undo()
    assert main(_args(reference, out)) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-3'} at step 3" in capfd.readouterr().out
    _assert_ends_like(out, reference)


def _child(tmp_path: Path, body: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``body`` (which patches ``train.align``) then ``train.align.main(argv)`` in a fresh Python process."""
    script = tmp_path / "child.py"
    script.write_text("import os, signal, sys\nimport train.align as align\n" + textwrap.dedent(body)
                      + "sys.exit(align.main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_second_signal_exits_at_once_without_saving(reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _child(tmp_path, """
        import time
        align.StopSignals.REPEAT_AFTER_S = 0.5
        real, calls = align.alignment_loss, [0]
        def loss(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:                   # the first micro-batch of step 3
                os.kill(os.getpid(), signal.SIGTERM)
            if calls[0] == 6:                   # the second: a second signal, 0.6 s after the first
                time.sleep(0.6)
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        align.alignment_loss = loss
    """, _args(reference, out))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "SIGTERM received" in proc.stderr and "SIGTERM again: exiting now without saving" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [n for n, _ in checkpoint_dirs(out)] == [2]                      # step 3 was not finished, nor saved
    assert main(_args(reference, out)) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in capsys.readouterr().out
    _assert_ends_like(out, reference)


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _child(tmp_path, """
        real = align.save_model
        def save_model(model, filename, *args, **kwargs):
            real(model, filename, *args, **kwargs)
            if ".step-4.tmp" in str(filename):  # the model of step 4 is written, nothing else yet
                os.kill(os.getpid(), signal.SIGKILL)
        align.save_model = save_model
    """, _args(reference, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = out / "checkpoints" / ".step-4.tmp"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert [n for n, _ in checkpoint_dirs(out)] == [2]
    assert main(_args(reference, out)) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in capsys.readouterr().out
    assert not partial.exists()                                             # cleaned by the next save
    _assert_ends_like(out, reference)


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _state_without_num_processes(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["num_processes"]
    path.write_text(json.dumps(state))


DAMAGE = {
    "model.safetensors": (_garbage, "SafetensorError"),                             # "invalid header length"
    "optimizer.pt": (_garbage, "unusable ("),
    "scheduler.pt": (lambda p: p.write_bytes(p.read_bytes()[:40]), "unusable ("),   # cut short
    "trainer_state.json": (_state_without_num_processes, "unusable (ValueError: no 'num_processes')"),
    "rng-0.pt": (Path.unlink, "is missing"),
    "run_config.json": (_garbage, "unusable (UnicodeDecodeError"),                   # the settings to compare with
}


@pytest.mark.parametrize("name", list(DAMAGE) + ["trainer_state.json (not JSON)"])
def test_a_damaged_newest_checkpoint_is_named_in_one_line_and_the_previous_one_is_used(
        reference, cut, tmp_path, capsys, name):
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    file = name.split()[0]
    damage, problem = DAMAGE[name] if name in DAMAGE else (lambda p: p.write_text("{\"step\": 4,"),
                                                           "unusable (JSONDecodeError")
    damage(out / "checkpoints" / "step-4" / file)
    assert main(_args(reference, out)) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("checkpoint ")]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"checkpoint {out / 'checkpoints' / 'step-4' / file} ")
    assert problem in lines[0] and lines[0].endswith("skipping step-4")
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in captured.out
    _assert_ends_like(out, reference)


def test_no_usable_checkpoint_stops_with_one_line(reference, cut, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    _garbage(out / "checkpoints" / "step-4" / "optimizer.pt")
    (out / "checkpoints" / "step-2" / "trainer_state.json").write_text("[]")
    assert main(_args(reference, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    named = [line.split()[1] for line in err.splitlines()[:2]]
    assert named == [str(out / "checkpoints" / "step-4" / "optimizer.pt"),
                     str(out / "checkpoints" / "step-2" / "trainer_state.json")]
    assert err.splitlines()[-1].startswith(f"error: no usable checkpoint in {out / 'checkpoints'}")
    assert not (out / "model").exists()


def test_a_checkpoint_of_another_process_count_stops_with_one_line(reference, cut, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    path = out / "checkpoints" / "step-4" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_processes": 2}))
    assert main(_args(reference, out)) == 2
    assert capsys.readouterr().err == (f"error: {path.parent} was written by 2 processes, this run has 1: resume "
                                       "with as many processes (the data position depends on it), or start again "
                                       "in a new --output-dir\n")


def test_stray_folders_beside_the_checkpoints_are_left_alone(reference, cut, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    shutil.copytree(out / "checkpoints" / "step-4", out / "checkpoints" / "step-20.bak")
    (out / "checkpoints" / "step-old").mkdir()
    assert main(_args(reference, out)) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-4'}" in capsys.readouterr().out
    _assert_ends_like(out, reference)
    assert (out / "checkpoints" / "step-20.bak").is_dir() and (out / "checkpoints" / "step-old").is_dir()
    assert [n for n, _ in checkpoint_dirs(out)] == [4, 6]                  # the save at step 6 pruned step-2


# One word of 45 random syllables: about 60 sub-words of the tiny tokenizer, far beyond max_length 16 (a
# repetitive word such as "ba" * 50 would not do: the tokenizer, trained on the corpus, learns "##babababa").
_rng = random.Random(0)
LONG_WORD = "".join(_rng.choice("bdgklmnprstvz") + _rng.choice("aeiou") for _ in range(45))


def _poisoned_corpora(folder: Path) -> dict[str, dict]:
    """A TSV and a JSONL corpus of 190 good lines each and 2 (1 %) poisoned with each kind, at known lines."""
    long_word = LONG_WORD
    tsv_poison = {b"\xff\xfe\xfd\tthe dog sees a cat": ("not valid UTF-8", "malformed"),
                  "\ufffd\ufffd\tthe dog sees a cat".encode(): ("source: no sub-word token", "dropped"),
                  "\u200b \u200b\tthe cat".encode(): ("source: no sub-word token", "dropped"),
                  f"the dog\t{long_word} sees a cat".encode(): ("target: no sub-word token within max_length 16",
                                                                "dropped"),
                  b"only one field": ("not two tab-separated fields", "malformed"),
                  b"der Hund\t ": ("empty target", "malformed")}
    jsonl_poison = {"[" * 100_000: ("JSON nested too deeply", "malformed"),
                    '{"source": "\\ud800", "target": "x"}': ("invalid Unicode (lone surrogate)", "malformed"),
                    '{"source": "a b", "target": ': ("invalid JSON", "malformed"),
                    '{"source": ["a"], "target": "b"}': ("non-string field", "malformed"),
                    '{"source": "the dog", "target": "\u200b\u200b"}': ("target: no sub-word token", "dropped")}
    expected: dict[str, dict] = {}
    for lang, name, poison, seed in (("xx", "xx.tsv", tsv_poison, 0), ("yy", "yy.jsonl", jsonl_poison, 1)):
        good = synthetic_pairs(190, seed=seed)
        lines = [(f"{s}\t{t}".encode() if name.endswith(".tsv") else json.dumps({"source": s, "target": t}))
                 for s, t in zip(good["source"], good["target"])]
        report: dict = {"malformed": {}, "dropped": {}, "examples": {}, "read": 190 + 2 * len(poison)}
        for k, line in enumerate(poison):
            for at in (10 + 37 * k, 100 + 19 * k):                      # 0-based positions in the file
                lines.insert(at, line)
        for k, line in enumerate(lines):
            if line in poison:
                reason, table = poison[line]
                report[table][reason] = report[table].get(reason, 0) + 1
                report["examples"].setdefault(reason, []).append(f"{name}:{k + 1}")
        data = b"\n".join(lines) + b"\n" if name.endswith(".tsv") else ("\n".join(lines) + "\n").encode()
        (folder / name).write_bytes(data)
        expected[lang] = report
    return expected


def test_a_corpus_with_every_kind_of_poisoned_line_trains_to_the_end_and_reports_each_kind(tmp_path, capsys):
    expected = _poisoned_corpora(tmp_path)
    out = tmp_path / "run"
    languages = (f"[{{lang: xx, format: tsv, path: {tmp_path / 'xx.tsv'}}}, "
                 f"{{lang: yy, format: jsonl, path: {tmp_path / 'yy.jsonl'}}}]")
    argv = ["--config", str(TINY), "--output-dir", str(out), "--data.languages", languages,
            "--data.pairs_per_language", "190", "--data.eval_pairs", "0", "--train.batch_size", "10",
            "--train.max_steps", "19", "--train.checkpoint_every", "0", "--model.max_length", "16",
            "--model.tiny.hidden_size", "32", "--model.tiny.intermediate_size", "64", "--model.tiny.vocab_size", "300"]
    assert main(argv) == 0                                  # 19 steps of 10 pairs: every kept pair, once
    assert json.loads((out / "metrics.json").read_text())["steps"] == 19
    report = {r["lang"]: r for r in json.loads((out / "data_report.json").read_text())}
    for lang, want in expected.items():
        got = report[lang]
        assert got["malformed"] == want["malformed"] and got["dropped"] == want["dropped"]
        assert got["read"] == want["read"] and got["unique_train"] == 190
        assert {r: got["examples"][r] for r in want["examples"]} == want["examples"]
    printed = capsys.readouterr().out
    assert "xx: read 202, malformed 6 (empty target: 2 at xx.tsv:" in printed
    # Independently of the harness's check: each dropped text leaves encode_words with an empty row, which is
    # what crashed training before (a pair with no valid token).
    tok = load_tokenizer(out / "init_model")
    for text in ("\ufffd\ufffd\ufffd", "\u200b \u200b", LONG_WORD + " sees a cat"):
        assert bool((encode_words(tok, [text.split()], max_length=16)["word_ids"] < 0).all())
