"""CPT, SFT and CPT+SFT: example builders on tiny inputs, the shared LM loss, and each method
trained through the CLI on the tiny model."""

import json

import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from conftest import interrupt_training_at, make_records
from kembed.cli import app
from kembed.methods import cpt, sft
from kembed.methods.common import lm_loss, lm_loss_reference, make_lm_collate
from kembed.prompts import PromptFormat


def test_cpt_blocks_wrap_concatenate_and_cut(tiny_tokenizer):
    docs = ["Mercury is closest.", "Venus is second."]
    enc = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    stream = [bos] + enc[0] + [eos] + [bos] + enc[1] + [eos]
    blocks = cpt.token_blocks(tiny_tokenizer, docs, 4)
    assert blocks == [stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert all(len(b) == 4 for b in blocks) and len(blocks) == len(stream) // 4


def test_sft_example_covers_the_answer_only(tiny_tokenizer):
    record = make_records(2)[1]
    example = sft.build_example(tiny_tokenizer, record, PromptFormat(), sft.Config())
    ids, mask = example["input_ids"], example["loss_mask"]
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Mercury"
    assert "Venus" not in tiny_tokenizer.decode(ids)  # no options in the prompt by default
    shown = sft.build_example(tiny_tokenizer, record, PromptFormat(), sft.Config(show_options=True))
    assert "A. Venus\nB. Mercury\nC. Mars" in tiny_tokenizer.decode(shown["input_ids"])


def test_lm_collate_and_loss(tiny_model, tiny_tokenizer):
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "loss_mask": [0, 1]}]
    batch = make_lm_collate(0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]]
    loss, _ = lm_loss(tiny_model, batch)
    # direct: each sequence alone, unpadded, cross-entropy of the labelled tokens
    nll = []
    for e in examples:
        logits = tiny_model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        for t in range(1, len(e["input_ids"])):
            if e["loss_mask"][t]:
                nll.append(F.cross_entropy(logits[t - 1:t], torch.tensor([e["input_ids"][t]])))
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-5)
    assert torch.allclose(loss, lm_loss_reference(tiny_model, batch)[0], atol=1e-5)
    every = make_lm_collate(0)([{"input_ids": [5, 6, 7], "loss_mask": [1, 1, 1]}])  # CPT: every token labelled
    assert torch.allclose(lm_loss(tiny_model, every)[0], lm_loss_reference(tiny_model, every)[0], atol=1e-5)


def run_method(method, model_dir, out, *extra):
    args = ["train", method, "--output", out, f"model={model_dir}", "limit=4", "validation=2", "precision=fp32",
            "train.batch_size=2", "train.learning_rate=1e-2", "train.warmup_ratio=0", "eval.limit=2", *extra]
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_sft_cpt_and_cpt_sft_train(data_dir, tiny_model_dir, tmp_path):
    for method, extra, stages in (("sft", ["sft.epochs=1"], 1), ("cpt", ["cpt.block_size=8", "cpt.epochs=1"], 1),
                                  ("cpt-sft", ["cpt-sft.cpt.block_size=8", "cpt-sft.sft.epochs=1"], 2)):
        out = tmp_path / method
        result = run_method(method, tiny_model_dir, out, *extra)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "state.json").read_text()) == {"iterations_done": stages}
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(e["event"] == "train" and "loss" in e for e in events)
        assert (out / "model" / "model.safetensors").exists() and not (out / "checkpoints").exists()


def test_lora_adapter_run_trains_and_evaluates(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    result = run_method("sft", tiny_model_dir, out, "sft.epochs=1",
                        "train.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    assert result.exit_code == 0, result.output
    assert (out / "model" / "adapter_config.json").exists() and not (out / "model" / "model.safetensors").exists()
    result = CliRunner().invoke(app, ["eval", "--domain", "current-events", "--model", str(out), "--limit", "2",
                                      "--output", str(tmp_path / "ev")], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_interrupted_epoch_resumes_from_its_checkpoint(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert run_method("sft", tiny_model_dir, a, "sft.epochs=2").exit_code == 0
    restore = interrupt_training_at(monkeypatch, 3)  # 2 steps per epoch: the first step of epoch 2
    assert run_method("sft", tiny_model_dir, b, "sft.epochs=2").exit_code == 130
    assert list((b / "checkpoints").glob("*/checkpoint-*")) and not (b / "model").exists()
    restore()
    result = CliRunner().invoke(app, ["train", "sft", "--output", str(b), "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_from_another_run(data_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cpt_run, sft_run = tmp_path / "cpt", tmp_path / "sft"
    assert run_method("cpt", tiny_model_dir, cpt_run, "cpt.block_size=8", "cpt.epochs=1").exit_code == 0
    result = run_method("sft", tiny_model_dir, sft_run, "sft.epochs=1", "train.learning_rate=1e-30", "--init-from", cpt_run)
    assert result.exit_code == 0, result.output
    # lr 1e-30 (a step far below an fp32 ulp of any weight): the SFT run's weights are exactly the CPT run's, not the base model's
    w_cpt, w_sft = load_file(cpt_run / "model" / "model.safetensors"), load_file(sft_run / "model" / "model.safetensors")
    assert all(torch.equal(w_cpt[k], w_sft[k]) for k in w_cpt)
    assert yaml.safe_load((sft_run / "config.yaml").read_text())["init_from"] == str(cpt_run)
    bad = run_method("sft", tiny_model_dir, tmp_path / "x", "--init-from", tmp_path)
    assert bad.exit_code == 2 and "not a kembed run" in bad.output


def test_raft_and_simrag_train_through_the_cli(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    raft = tmp_path / "raft"
    result = run_method("raft", tiny_model_dir, raft, "raft.epochs=1", "raft.k=1")
    assert result.exit_code == 0, result.output
    examples = [json.loads(line) for line in (raft / "raft_examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and {e["builder"] for e in examples} == {"extractive"}
    simrag = tmp_path / "simrag"
    result = run_method("simrag", tiny_model_dir, simrag, "simrag.documents=2", "simrag.max_new_tokens=4")
    assert result.exit_code == 0, result.output
    assert (simrag / "simrag_generated.jsonl").exists()
    assert json.loads((simrag / "state.json").read_text()) == {"iterations_done": 2}
