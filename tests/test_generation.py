"""LocalGenerator: kembed's greedy decoding gives transformers' greedy tokens (fp32), in input
order, with early-finishing rows, out-of-memory halving and the progress contract."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from kembed.generation import LocalGenerator
from kembed.models import Placement

FP32 = Placement("cpu", "fp32")
MAX_NEW = 24
PROMPTS = [  # different lengths, not in length order
    "Mercury is the planet closest to the Sun. Which?",
    "Paris",
    "Aspirin inhibits cyclooxygenase; penicillin blocks cell wall synthesis. Explain.",
    "The court held",
    "A B C D E",
    "The Eiffel Tower is in Paris, the capital of France. Mercury is the planet closest to the Sun.",
    "Which of the following is correct?",
    "Eiffel",
]


def lively_model(tokenizer):
    """The tiny model with larger random weights, so greedy replies vary from token to token."""
    model = build_tiny_model(tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def templated(tokenizer, prompt: str) -> list[int]:
    """The chat-templated user turn with the generation prompt, as token ids."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def one_at_a_time(model, tokenizer, prompts, max_new_tokens=MAX_NEW):
    """transformers' greedy tokens per prompt, each prompt alone (no padding), cut after eos."""
    stop = set(model.generation_config.eos_token_id)
    outs = []
    for prompt in prompts:
        x = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
        with torch.no_grad():
            row = model.generate(**x, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)[0, x["input_ids"].shape[1]:].tolist()
        outs.append(row[:next((k + 1 for k, t in enumerate(row) if t in stop), len(row))])
    return outs


@pytest.fixture
def early(tiny_tokenizer):
    """A lively model whose eos is a token it emits in some replies (and not in others), and the
    reference replies: some end early, some run to ``MAX_NEW``."""
    model = lively_model(tiny_tokenizer)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id]
    free = one_at_a_time(model, tiny_tokenizer, PROMPTS)
    # the token found in most replies but not in all of them
    counts = {t: sum(t in row for row in free) for row in free for t in row}
    eos = max((t for t, n in counts.items() if n < len(PROMPTS)), key=lambda t: (counts[t], -t))
    model.generation_config.eos_token_id = [eos, tiny_tokenizer.eos_token_id]
    reference = one_at_a_time(model, tiny_tokenizer, PROMPTS)
    lengths = [len(r) for r in reference]
    assert any(n < MAX_NEW for n in lengths) and any(n == MAX_NEW and eos not in r for n, r in zip(lengths, reference))
    assert len(set(lengths)) > 2  # rows finish at different steps
    return model, reference


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tokens_equal_transformers_one_at_a_time(early, tiny_tokenizer, batch_size):
    model, reference = early
    seen = []
    generator = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_size=batch_size)
    result = generator.generate_ids(PROMPTS, progress=seen.append)
    assert [out for _, out in result] == reference  # token for token, in input order
    assert sum(seen) == len(PROMPTS)


def test_counted_contract_and_reference_implementation(early, tiny_tokenizer):
    model, reference = early
    seen = []
    new = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_size=3)
    old = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_size=3,
                         implementation="transformers")
    counted = new.generate_counted(PROMPTS)
    assert counted == old.generate_counted(PROMPTS, progress=seen.append)
    assert sum(seen) == len(PROMPTS)
    for prompt, (text, n_prompt, n_out), ids in zip(PROMPTS, counted, reference):
        assert n_prompt == len(templated(tiny_tokenizer, prompt)) and n_out == len(ids)
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="implementation"):
        LocalGenerator(model, tiny_tokenizer, FP32, implementation="vllm")


def test_out_of_memory_halves_without_counting_twice(early, tiny_tokenizer, monkeypatch):
    model, reference = early
    forward, widths = model.forward, []

    def small_memory(*args, **kwargs):  # more than 2 rows in a pass "runs out of memory"
        widths.append(kwargs["input_ids"].shape[0])
        if widths[-1] > 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", small_memory)
    seen = []
    result = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW).generate_ids(PROMPTS, seen.append)
    assert [out for _, out in result] == reference
    assert sum(seen) == len(PROMPTS) and max(widths) > 2 and widths[-1] <= 2


def test_batch_tokens_bounds_the_batch(early, tiny_tokenizer, monkeypatch):
    model, reference = early
    forward, shapes = model.forward, []

    def spy(*args, **kwargs):  # rows in the pass and the key/value positions they attend over
        shapes.append(tuple(kwargs["attention_mask"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    budget = 2 * (max(len(templated(tiny_tokenizer, p)) for p in PROMPTS) + MAX_NEW)
    generator = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_tokens=budget)
    assert [out for _, out in generator.generate_ids(PROMPTS)] == reference
    rows = [r for r, _ in shapes]
    assert 1 < max(rows) < len(PROMPTS)  # the budget, not batch_size, bounds the batch
    assert all(r * s <= budget for r, s in shapes)


def test_peft_model_and_bf16(early, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, _ = early
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    generator = LocalGenerator(peft_model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_size=3)
    assert [out for _, out in generator.generate_ids(PROMPTS)] == one_at_a_time(peft_model, tiny_tokenizer, PROMPTS)
    bf16 = LocalGenerator(peft_model, tiny_tokenizer, Placement("cpu", "bf16"), max_new_tokens=MAX_NEW, batch_size=3)
    replies = bf16.generate_counted(PROMPTS)
    assert len(replies) == len(PROMPTS) and all(0 < n <= MAX_NEW for _, _, n in replies)
    assert next(peft_model.parameters()).dtype == torch.float32  # generated on a bf16 copy


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_sliding_window_model_generates_as_transformers_does(tiny_tokenizer, family):
    """Prompts longer than the model's 8-token window: the tokens equal transformers' greedy
    ones (kembed's batched decoding hands such a model to ``generate``)."""
    from conftest import build_windowed_model

    model = build_windowed_model(tiny_tokenizer, family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id]
    reference = one_at_a_time(model, tiny_tokenizer, PROMPTS)
    assert max(len(templated(tiny_tokenizer, p)) for p in PROMPTS) > 8
    generator = LocalGenerator(model, tiny_tokenizer, FP32, max_new_tokens=MAX_NEW, batch_size=8)
    assert [out for _, out in generator.generate_ids(PROMPTS)] == reference


def test_prepacked_linear_weights_give_the_same_bf16_tokens(early, tiny_tokenizer, monkeypatch):
    """Decode steps on oneDNN-prepacked bf16 weights (kembed.generation.prepacked_linears) give
    the tokens of the plain weights, bit for bit."""
    import kembed.generation
    from kembed.generation import prepacked_linears

    model, _ = early
    half = Placement("cpu", "bf16")
    generator = LocalGenerator(model, tiny_tokenizer, half, max_new_tokens=MAX_NEW, batch_size=3)
    packed = [out for _, out in generator.generate_ids(PROMPTS)]
    monkeypatch.setattr(kembed.generation, "PREPACKED_ROWS", 0)  # every input past it: the plain weights
    assert [out for _, out in generator.generate_ids(PROMPTS)] == packed
    layer = model.model.layers[0].mlp.down_proj
    with prepacked_linears(model.to(torch.bfloat16)) as n:
        assert n == 2 * (4 + 3) + 1 and "forward" in vars(layer)  # attention and MLP projections, LM head
    assert "forward" not in vars(layer) and next(model.parameters()).dtype == torch.bfloat16
