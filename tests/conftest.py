"""Shared fixtures: a tiny Llama model and a byte-level BPE tokenizer built in code (no Hub)."""

from __future__ import annotations

import json

import pytest

from kembed.records import QARecord

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Mercury is the planet closest to the Sun.",
    "Aspirin inhibits cyclooxygenase; penicillin blocks cell wall synthesis.",
    "The court held that the contract was void for lack of consideration.",
    "Which of the following is correct? Answer: A B C D E",
]


def make_records(n: int = 6, domain: str = "toy", split: str = "train") -> list[QARecord]:
    """Small QA records with knowledge snippets, made up for the tests."""
    facts = [
        ("Where is the Eiffel Tower?", ("Paris", "Rome", "Berlin"), 0, ("The Eiffel Tower is in Paris.",)),
        ("Which planet is closest to the Sun?", ("Venus", "Mercury", "Mars"), 1,
         ("Mercury is the planet closest to the Sun.", "Venus is the second planet.")),
        ("What does penicillin block?", ("DNA synthesis", "protein synthesis", "cell wall synthesis"), 2,
         ("Penicillin blocks cell wall synthesis.",)),
    ]
    records = []
    for i in range(n):
        q, opts, gold, ctx = facts[i % len(facts)]
        records.append(QARecord(f"{split}-{i}", domain, split, f"{q} ({i})", opts,
                                tuple("ABCDE"[: len(opts)]), gold, ctx))
    return records


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(tokenizer, seed: int = 0):
    """A 2-layer Llama with hidden size 32 and fixed initialisation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def build_windowed_model(tokenizer, family: str, attention: str = "sdpa"):
    """A 2-layer model with an 8-token sliding window: Mistral (every layer windowed) or Qwen2
    with its first layer full and its second windowed (``layer_types``)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8,
                 attn_implementation=attention, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**shape)).eval()
    config = Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model and tokenizer saved as an HF model directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_upstream_dir(root, n_train: int = 6, n_dev: int = 3, n_test: int = 4):
    """A data directory laid out like the upstream RLAG ``data/`` folder, with a small made-up
    CurrentEvents domain in the upstream JSON schema."""
    from pathlib import Path

    folder = Path(root) / "CurrentEvents"
    folder.mkdir(parents=True, exist_ok=True)

    def rows(split, n):
        out = []
        for r in make_records(n, split=split):
            out.append({"idx": len(out) + 1, "question": r.question, "options": dict(zip(r.labels, r.options)),
                        "answer": r.answer, "answer_idx": r.answer_label, "ctx": "\n".join(r.knowledge)})
        return out

    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        (folder / f"CurrentEvents_{split}.json").write_text(json.dumps(rows(split, n)))
    (folder / "CurrentEvents.txt").write_text("The Eiffel Tower is in Paris.\nMercury is closest to the Sun.\n")
    return Path(root)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = write_upstream_dir(tmp_path / "data")
    monkeypatch.setenv("KEMBED_DATA_DIR", str(path))
    return path


def interrupt_training_at(monkeypatch, call: int):
    """Make the trainer's ``compute_loss`` raise KeyboardInterrupt (Ctrl-C) at its ``call``-th
    call; returns a function that puts the real one back."""
    from kembed.trainer import MethodTrainer

    real, calls = MethodTrainer.compute_loss, []

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MethodTrainer, "compute_loss", interrupting)
    return lambda: monkeypatch.setattr(MethodTrainer, "compute_loss", real)


def write_evaluation(folder, model, correct, explanations=None, mode="closed-book", knowledge=None):
    """An evaluation directory as `kembed eval` writes it, for the toy test split: record i is
    answered correctly when ``correct[i]``; ``explanations``: record index -> text saved with it;
    ``knowledge``: record i's knowledge class (as `kembed eval` marks a trained run's samples)."""
    folder.mkdir(parents=True)
    from kembed.data import load_records

    records = load_records("current-events", "test")
    samples = []
    for i, (record, ok) in enumerate(zip(records, correct)):
        predicted = record.answer_index if ok else (record.answer_index + 1) % len(record.options)
        sample = {"id": record.id, "gold": record.answer_index, "predicted": {"token_mean": predicted},
                  "correct": {"token_mean": bool(ok)}}
        if knowledge:
            sample["knowledge"] = knowledge[i]
        if explanations and i in explanations:
            sample["explanation"] = {"prompt": "p", "text": explanations[i]}
        samples.append(sample)
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"domain": "current-events", "split": "test", "model": str(model), "mode": mode, "format": "raw",
               "n": len(samples), "accuracy": {"token_mean": sum(correct) / len(correct)},
               "ci95": {"token_mean": [0.0, 1.0]}}
    if explanations is not None:
        summary["explanations"] = {"model": str(model), "n": len(explanations)}
    (folder / "results.json").write_text(json.dumps(summary))
    return records
