"""The CLI, in-process (typer's CliRunner), on a tiny model and a tiny data directory."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kembed.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_does_not_import_torch():
    code = ("import sys; from kembed.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ls_lists_domains_methods_recipes_models():
    result = invoke("ls")
    assert result.exit_code == 0
    for name in ("current-events", "medical", "rlag", "smollm2-135m-instruct"):
        assert name in result.output


def test_data_validate(data_dir):
    result = invoke("data", "validate", "--domain", "current-events")
    assert result.exit_code == 0, result.output
    assert "records read" in result.output


def test_malformed_data_is_one_line_error(data_dir):
    (data_dir / "CurrentEvents" / "CurrentEvents_dev.json").write_text('[{"question": 3, "options": {}}]')
    result = invoke("data", "validate", "--domain", "current-events")
    assert result.exit_code == 2
    assert "CurrentEvents_dev.json" in result.output and "question" in result.output
    assert "Traceback" not in result.output


def test_eval_writes_results_and_samples(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    result = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--output", out,
                    "--precision", "fp32", "--mode", "oracle-context")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n"] == 4 and summary["mode"] == "oracle-context" and summary["split"] == "test"
    for scorer in ("token_mean", "sum", "char_norm"):
        assert 0 <= summary["ci95"][scorer][0] <= summary["accuracy"][scorer] <= summary["ci95"][scorer][1] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"id", "gold", "predicted", "scores"} <= set(samples[0])
    assert len(samples[0]["scores"]["token_mean"]) == 3
    again = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--output", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def train_args(model_dir, out, *extra):
    return ["train", "rlag", "--output", out, f"model={model_dir}", "limit=4", "validation=2", "precision=fp32",
            "rlag.chunks=2", "rlag.epochs=1", "train.batch_size=2", "train.learning_rate=1e-2", "train.warmup_ratio=0", "eval.limit=2", "rlag.grad_norm_every=1", *extra]


def test_train_rlag_writes_a_complete_run(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(*train_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    for name in ("kembed-run.json", "config.yaml", "environment.json", "metrics.jsonl", "state.json",
                 "pairs/iter-001.jsonl", "pairs/iter-002.jsonl", "model/config.json"):
        assert (out / name).exists(), name
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampling = [e for e in events if e["event"] == "sampling"]
    assert len(sampling) == 2 and {"chosen_correct", "rejected_correct", "chosen_failure"} <= set(sampling[0])
    assert any("reward_knowledge" in e for e in events if e["event"] == "train")
    assert all("dev_accuracy" in e for e in events if e["event"] == "iteration_end")
    assert all(e["dev_split"] == "validation" for e in events if e["event"] == "iteration_end"), events
    sample = json.loads((out / "data_sample.json").read_text())  # the seeded sample, saved
    assert len(sample["train_ids"]) == 4 and len(sample["validation_ids"]) == 2 and sample["seed"] == 42
    assert not set(sample["train_ids"]) & set(sample["validation_ids"])
    coverage = next(e for e in events if e["event"] == "coverage")
    assert {"test", "dev", "validation"} <= set(coverage) and coverage["test"]["questions"] == 4
    assert any("grad_norm_knowledge" in e for e in events if e["event"] == "train")
    from transformers import AutoModelForCausalLM  # the model loads without kembed

    AutoModelForCausalLM.from_pretrained(out / "model")
    # the trained run is a model argument for eval; its results carry coverage and what it trained on
    result = invoke("eval", "--domain", "current-events", "--model", out, "--output", tmp_path / "ev", "--limit", 2)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert summary["coverage"]["questions"] == 2 and summary["trained_on"].startswith("rlag: 4 records")
    table = invoke("results", "--markdown", tmp_path / "ev").output
    assert "| rlag: 4 records (seed 42) |" in table and table.count("\n|") >= 2


def test_interrupted_run_resumes_to_the_same_weights(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from kembed.methods import rlag

    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(*train_args(tiny_model_dir, a)).exit_code == 0
    # b is interrupted while sampling for iteration 2
    real_sample, calls = rlag.sample_pairs, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(rlag, "sample_pairs", interrupting)
    result = invoke(*train_args(tiny_model_dir, b))
    assert result.exit_code == 130 and "--resume" in result.output
    assert json.loads((b / "state.json").read_text()) == {"iterations_done": 1}
    assert not (b / "pairs" / "iter-002.jsonl").exists()
    monkeypatch.setattr(rlag, "sample_pairs", real_sample)
    result = invoke("train", "rlag", "--output", b, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((b / "state.json").read_text()) == {"iterations_done": 2}
    starts = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [e["resume"] for e in starts if e["event"] == "start"] == [False, True]
    # same seed, same result: the resumed run ends with the uninterrupted run's weights,
    # and training did change them
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in w0)


def test_bad_recipe_key_and_existing_output(data_dir, tiny_model_dir, tmp_path):
    result = invoke(*train_args(tiny_model_dir, tmp_path / "r", "rlag.gama=3"))
    assert result.exit_code == 2 and "unknown key 'rlag.gama'" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("earlier results")
    result = invoke(*train_args(tiny_model_dir, tmp_path / "full"))
    assert result.exit_code == 2 and "--resume" in result.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "earlier results"


def test_unknown_domain_and_method(data_dir, tmp_path):
    assert "unknown method" in invoke("train", "nope").output
    result = invoke("eval", "--domain", "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.output
    result = invoke("train", "rlag", "--domain", "nowhere", "--output", tmp_path / "run")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()  # nothing written before the data loads


def test_interrupted_dev_eval_keeps_the_finished_iteration(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from kembed.train import TrainContext

    out, calls = tmp_path / "run", []
    real = TrainContext.dev_accuracy

    def interrupting(self, label):
        calls.append(label)
        if label == "after iteration 1":
            raise KeyboardInterrupt
        return real(self, label)

    monkeypatch.setattr(TrainContext, "dev_accuracy", interrupting)
    assert invoke(*train_args(tiny_model_dir, out)).exit_code == 130
    # the weights of iteration 1 are saved and counted: resuming trains iteration 2 only
    assert json.loads((out / "state.json").read_text()) == {"iterations_done": 1}
    monkeypatch.setattr(TrainContext, "dev_accuracy", real)
    assert invoke("train", "rlag", "--output", out, "--resume").exit_code == 0
    sampled = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "sampling"]
    assert sampled == [1, 2]


def test_one_line_errors_for_bad_cli_input(data_dir, tiny_model_dir, tmp_path):
    result = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--scorer", "bogus")
    assert result.exit_code == 2 and "--scorer" in result.output
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    result = invoke("results", bad)
    assert result.exit_code == 2 and "results.json" in result.output and "Traceback" not in result.output
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = invoke(*train_args(tiny_model_dir, a_file))
    assert result.exit_code == 2 and "is a file" in result.output
