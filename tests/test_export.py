"""`kembed data export --format trl`: the examples runs trained on, loaded with `datasets` and
checked against TRL's dataset formats; one SFTTrainer step on an exported set."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_model
from kembed.cli import app
from kembed.errors import DataError, KembedError
from kembed.export import export_run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def train(method, model_dir, out, *extra):
    result = invoke("train", method, "--output", out, f"model={model_dir}", "limit=4", "validation=2",
                    "precision=fp32", "train.batch_size=2", "train.warmup_ratio=0", "eval.split=null", *extra)
    assert result.exit_code == 0, result.output
    return out


def load(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def records_of(run):
    """The run's training records, as the run drew them."""
    from kembed.data import load_records

    ids = json.loads((run / "data_sample.json").read_text())["train_ids"]
    by_id = {r.id: r for r in load_records("current-events", "train")}
    return [by_id[i] for i in ids]


def test_cpt_sft_export_loads_with_datasets_and_trains_a_trl_sft_step(data_dir, tiny_model_dir, tiny_tokenizer,
                                                                       tmp_path):
    from trl import SFTConfig, SFTTrainer

    run = train("cpt-sft", tiny_model_dir, tmp_path / "run", "cpt-sft.cpt.block_size=8", "cpt-sft.cpt.epochs=1",
                "cpt-sft.sft.epochs=1")
    result = invoke("data", "export", run, "--format", "trl")
    assert result.exit_code == 0, result.output
    out = run / "export-trl"
    assert sorted(p.name for p in out.iterdir()) == ["001-stage-1-cpt.jsonl", "002-stage-2-sft.jsonl"]
    assert "4 prompt-completion examples" in result.output

    cpt = load(out / "001-stage-1-cpt.jsonl")  # TRL's language-modeling format: the documents CPT read
    assert cpt.column_names == ["text"] and len(cpt) >= 1
    assert set(cpt["text"]) <= {z for r in records_of(run) for z in r.knowledge}

    sft = load(out / "002-stage-2-sft.jsonl")  # conversational prompt-completion
    assert sorted(sft.column_names) == ["completion", "prompt"] and len(sft) == 4
    records = records_of(run)
    assert [row["completion"] for row in sft] == [[{"role": "assistant", "content": r.answer}] for r in records]
    for row, record in zip(sft, records):
        assert [m["role"] for m in row["prompt"]] == ["user"] and record.question in row["prompt"][0]["content"]

    model = build_tiny_model(tiny_tokenizer).train()
    before = [p.detach().clone() for p in model.parameters()]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                     dataloader_num_workers=0, max_length=256, disable_tqdm=True,
                     activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft, processing_class=tiny_tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_rlag_export_is_a_trl_preference_set(data_dir, tiny_model_dir, tiny_tokenizer, tmp_path):
    from trl.data_utils import apply_chat_template, is_conversational

    run = train("rlag", tiny_model_dir, tmp_path / "run", "rlag.chunks=2", "rlag.epochs=1", "rlag.chosen_is_gold=true")
    files = export_run(run)
    assert [f.source.name for f in files] == ["001-iteration-1-2.jsonl", "002-iteration-2-2.jsonl"]
    assert {f.kind for f in files} == {"preference"}

    # the trained pairs whose answers differ, in order: what a preference set can hold
    pairs = [json.loads(line) for it in (1, 2)
             for line in (run / "pairs" / f"iter-{it:03d}.jsonl").read_text().splitlines()]
    preferred = [p for p in pairs if p["trained"] and p["chosen_index"] != p["rejected_index"]]
    assert preferred, "the tiny model agreed with the gold answer on every question: nothing to check"
    assert sum(f.rows for f in files) == len(preferred)
    assert sum(f.skipped for f in files) == sum(p["trained"] for p in pairs) - len(preferred)

    rows = [row for f in files if f.path for row in load(f.path)]
    by_id = {r.id: r for r in records_of(run)}
    for row, pair in zip(rows, preferred):
        # TRL's conversational preference type: exactly prompt, chosen and rejected, each a list of messages
        assert set(row) == {"prompt", "chosen", "rejected"} and is_conversational(row)
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["chosen"] == [{"role": "assistant", "content": pair["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": pair["rejected"]}]
        record = by_id[pair["id"]]
        assert pair["chosen"] == record.answer  # chosen_is_gold
        prompt = row["prompt"][0]["content"]
        assert record.question in prompt and not any(z in prompt for z in record.knowledge)  # closed-book
        text = apply_chat_template(row, tiny_tokenizer)  # TRL's own preprocessing accepts it
        assert set(text) == {"prompt", "chosen", "rejected"} and text["prompt"].endswith("<|im_start|>assistant\n")


def test_raft_and_simrag_export_what_they_trained_on(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from test_simrag import Scripted

    raft = train("raft", tiny_model_dir, tmp_path / "raft", "raft.epochs=1", "raft.k=1", "raft.distractors=random")
    (only,) = export_run(raft)
    assert only.source.name == "001-raft.jsonl" and only.kind == "prompt-completion"
    built = [json.loads(line) for line in (raft / "raft_examples.jsonl").read_text().splitlines()]
    for row, example, record in zip(load(only.path), built, records_of(raft)):
        prompt = row["prompt"][0]["content"]
        assert all(f"<DOCUMENT>{d}</DOCUMENT>" in prompt for d in example["documents"]) and record.question in prompt
        assert row["completion"] == [{"role": "assistant", "content": example["target"]}]
        assert example["target"].endswith(f"<ANSWER>: {record.answer}")

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("kembed.generation.LocalGenerator", Scripted)
    simrag = train("simrag", tiny_model_dir, tmp_path / "simrag", "simrag.documents=2")
    stage1, stage2 = export_run(simrag)
    assert (stage1.source.name, stage2.source.name) == ("001-stage-i.jsonl", "002-stage-ii.jsonl")
    kept = [json.loads(line) for line in (simrag / "simrag_kept.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (simrag / "simrag_stage1.jsonl").read_text().splitlines()]
    assert kept and stage1.rows == len(first) and stage2.rows == len(kept) + len(first)
    pairs = [(row["prompt"][0]["content"], row["completion"][0]["content"]) for row in load(stage2.path)]
    assert pairs == [(p["training_prompt"], p["target"]) for p in kept] + [(e["prompt"], e["target"]) for e in first]


def test_every_kind_converts_and_bad_input_is_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    (run / "kembed-run.json").write_text("{}")
    raft_prompt = "<DOCUMENT>d</DOCUMENT>\nQuestion: q"
    rows = {"001-raft.jsonl": [{"prompt": raft_prompt, "completion": "<ANSWER>: a"}],
            "002-rlag.jsonl": [{"prompt": "q", "augmented_prompt": "z q", "chosen": "a", "rejected": "b",
                                "knowledge": ["z"]},
                               {"prompt": "q2", "augmented_prompt": "z q2", "chosen": "a", "rejected": "a",
                                "knowledge": ["z"]}],  # no preference: left out
            "003-cpt.jsonl": [{"text": "A document."}]}
    for name, content in rows.items():
        (run / "examples" / name).write_text("".join(json.dumps(r) + "\n" for r in content))
    files = export_run(run, output=tmp_path / "out")
    assert [(f.kind, f.rows, f.skipped) for f in files] == [("prompt-completion", 1, 0), ("preference", 1, 1),
                                                            ("language-modeling", 1, 0)]
    written = {f.path.name: [json.loads(line) for line in f.path.read_text().splitlines()] for f in files}
    assert written["001-raft.jsonl"] == [{"prompt": [{"role": "user", "content": raft_prompt}],
                                          "completion": [{"role": "assistant", "content": "<ANSWER>: a"}]}]
    assert written["002-rlag.jsonl"] == [{"prompt": [{"role": "user", "content": "q"}],
                                          "chosen": [{"role": "assistant", "content": "a"}],
                                          "rejected": [{"role": "assistant", "content": "b"}]}]
    assert written["003-cpt.jsonl"] == [{"text": "A document."}]

    (run / "examples" / "001-raft.jsonl").write_text('{"prompt": "q", "completion": 3}\n')
    with pytest.raises(DataError, match="001-raft.jsonl: record 0, field 'completion'"):
        export_run(run)
    (run / "examples" / "001-raft.jsonl").write_text('{"question": "q"}\n')
    result = invoke("data", "export", run)
    assert result.exit_code == 2 and "001-raft.jsonl: record 0" in result.output and "Traceback" not in result.output
    with pytest.raises(KembedError, match="unknown export format"):
        export_run(run, "alpaca")
    result = invoke("data", "export", tmp_path / "out")
    assert result.exit_code == 2 and "not a kembed run directory" in result.output
