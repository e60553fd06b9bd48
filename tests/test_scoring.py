import dataclasses
import json

import pytest
import torch

from conftest import make_records
from kembed.errors import ModelError
from kembed.models import Placement
from kembed.prompts import (FORMATS, RAFT_INSTRUCTION, PromptFormat, answer_stem, documents_prompt, raft_prompt,
                            truncate_knowledge)
from kembed.scoring import (OptionScorer, OptionScores, batch_cost, build_prompt, encode_options,
                            logprob_sums_packed, logprob_sums_reference, packed_length, packed_rows, run_halving,
                            token_budget_batches)

FP32 = Placement("cpu", "fp32")


@pytest.mark.parametrize("implementation", ["packed", "shared_prefix"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_knowledge", [False, True])
def test_fast_scorers_match_reference(tiny_model, tiny_tokenizer, with_knowledge, fmt, implementation):
    fast = OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation=implementation, fmt=fmt)
    slow = OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation="reference", fmt=fmt)
    reasoning = "Because ##begin_quote##it says so##end_quote## <ANSWER>: never read" if fmt == "raft" else None
    for record in make_records(6):
        knowledge = fast.knowledge(record) if with_knowledge else None
        a, b = fast.score(record, knowledge, reasoning), slow.score(record, knowledge, reasoning)
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        for scorer in ("token_mean", "sum", "char_norm"):
            assert a.predict(scorer) == b.predict(scorer)


@pytest.mark.parametrize("implementation", ["packed", "shared_prefix"])
@pytest.mark.parametrize("batch_tokens", [1, 300, 100_000])
def test_batches_across_questions_match_reference(tiny_model, tiny_tokenizer, batch_tokens, implementation):
    """Questions of different prompt lengths and option counts, batched under any budget (one
    question per batch, a few, all at once), score as the reference does, in input order."""
    records = make_records(6)
    records[2] = dataclasses.replace(records[2], options=records[2].options[:2], labels=records[2].labels[:2],
                                     answer_index=0)
    fast = OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation=implementation, batch_tokens=batch_tokens)
    slow = OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation="reference")
    knowledge = [fast.knowledge(r) if i % 2 else None for i, r in enumerate(records)]  # mixed prompt lengths
    if implementation == "packed":  # the budget decides how many questions share a row
        rows = packed_rows([fast.encode(r, k) for r, k in zip(records, knowledge)], batch_tokens)
        assert len(rows) == {1: 6, 100_000: 1}.get(batch_tokens, len(rows))
    done = []
    batched = fast.score_many(records, knowledge, progress=done.append)
    assert sum(done) == len(records)
    for record, k, a in zip(records, knowledge, batched):
        b = slow.score(record, k)
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)


def test_packed_rows_fill_up_to_the_budget():
    questions = [([0] * n, [[1, 2], [3]]) for n in (5, 1, 3, 8)]  # packed lengths 6, 2, 4, 9
    assert packed_rows(questions, 10) == [[1, 2], [0], [3]]  # by length: 2 + 4, then 6 (+ 9 > 10), then 9
    assert packed_rows(questions, 4) == [[1], [2], [0], [3]]  # too long for the budget: a row of its own
    assert packed_rows(questions, 100) == [[1, 2, 0, 3]]


def test_packed_row_under_eager_attention(tiny_tokenizer):
    """The packed row's mask works as an additive mask too (eager attention), and the row holds
    each prompt once and each option but its last token."""
    from conftest import build_tiny_model

    model = build_tiny_model(tiny_tokenizer)
    model.config._attn_implementation = "eager"
    scorer = OptionScorer(model, tiny_tokenizer, FP32, implementation="reference")
    records = make_records(3)
    questions = [scorer.encode(r, scorer.knowledge(r)) for r in records]
    assert packed_length(questions[0]) == len(questions[0][0]) + sum(len(o) - 1 for o in questions[0][1])
    packed = logprob_sums_packed(model, questions, "cpu")
    for question, sums in zip(questions, packed):
        assert sums == pytest.approx(logprob_sums_reference(model, *question, "cpu"), abs=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_packed_row_keeps_a_sliding_window(tiny_tokenizer, family, attention):
    """Prompts longer than the model's sliding window: each option token attends only to the
    tokens within the window before it, as in the reference's own forward pass, on the windowed
    layers, and to its whole prompt on the full ones."""
    from conftest import build_windowed_model

    model = build_windowed_model(tiny_tokenizer, family, attention)
    scorer = OptionScorer(model, tiny_tokenizer, FP32, implementation="reference")
    questions = [scorer.encode(r, scorer.knowledge(r)) for r in make_records(3)]
    assert min(len(prefix) for prefix, _ in questions) > 8 and max(len(o) for _, opts in questions for o in opts) > 1
    packed = logprob_sums_packed(model, questions, "cpu")
    for question, sums in zip(questions, packed):
        assert sums == pytest.approx(logprob_sums_reference(model, *question, "cpu"), abs=1e-4)


def test_packed_scoring_names_a_layer_type_it_has_no_mask_for(tiny_tokenizer):
    from conftest import build_windowed_model
    from kembed.tensors import packed_attention_mask

    model = build_windowed_model(tiny_tokenizer, "qwen2")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ModelError, match="chunked_attention layers .*--scorer shared_prefix"):
        packed_attention_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.arange(2)[None], model)


def test_bf16_scores_on_a_bf16_copy_of_the_weights(tiny_model, tiny_tokenizer):
    records = make_records(4)
    was_training = tiny_model.training
    tiny_model.train()
    try:
        half = OptionScorer(tiny_model, tiny_tokenizer, Placement("cpu", "bf16")).score_many(records, [None] * 4)
        assert next(tiny_model.parameters()).dtype == torch.float32 and tiny_model.training  # the model is untouched
    finally:
        tiny_model.train(was_training)
    full = OptionScorer(tiny_model, tiny_tokenizer, FP32).score_many(records, [None] * 4)
    for a, b in zip(half, full):
        assert a.logprob_sum == pytest.approx(b.logprob_sum, rel=0.05, abs=0.05)


def test_token_budget_groups_by_prompt_length():
    questions = [([1] * n, [[2, 3], [4]]) for n in (9, 2, 5, 3)]
    batches = token_budget_batches(questions, 40)
    assert [len(questions[i][0]) for b in batches for i in b] == [2, 3, 5, 9]  # sorted by prompt length
    assert all(batch_cost([questions[i] for i in b]) <= 40 or len(b) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_out_of_memory_halves_and_retries():
    calls = []

    def fn(items):
        calls.append(len(items))
        if len(items) > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return [x * 10 for x in items]

    assert run_halving(fn, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert calls == [5, 2, 3, 1, 2]  # 5 fails, halves 2 + 3, the 3 fails and halves 1 + 2
    with pytest.raises(RuntimeError, match="other"):
        run_halving(lambda items: (_ for _ in ()).throw(RuntimeError("other")), [1, 2])
    with pytest.raises(ModelError, match="single item"):
        run_halving(lambda items: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")), [1, 2])


def test_reference_is_the_chain_rule(tiny_model, tiny_tokenizer):
    """The reference scorer equals a hand computation of sum_t log p(o_t | prompt, o_<t)."""
    record = make_records(1)[0]
    prefix, options = encode_options(tiny_tokenizer, record.question, record.options)
    sums = logprob_sums_reference(tiny_model, prefix, options, "cpu")
    for total, ids in zip(sums, options):
        seq = prefix + ids
        expected = 0.0
        for t in range(len(prefix), len(seq)):
            logits = tiny_model(input_ids=torch.tensor([seq[:t]])).logits[0, -1]
            expected += logits.log_softmax(-1)[seq[t]].item()
        assert total == pytest.approx(expected, abs=1e-4)


def test_scorers_from_same_sums():
    s = OptionScores([-2.0, -3.0], [1, 3], [10, 2])
    assert s.scores("token_mean") == [-2.0, -1.0]
    assert s.predict("token_mean") == 1
    assert s.predict("sum") == 0
    assert s.scores("char_norm") == [-0.2, -1.5]
    assert s.predict("char_norm") == 0
    with pytest.raises(ValueError):
        s.scores("nope")


def test_knowledge_truncation(tiny_tokenizer):
    snippets = ("Mercury is the planet closest to the Sun.", "Venus is the second planet.")
    n_first = len(tiny_tokenizer(snippets[0], add_special_tokens=False)["input_ids"])
    assert truncate_knowledge(snippets, tiny_tokenizer, 0) == snippets
    assert truncate_knowledge(snippets, tiny_tokenizer, n_first) == snippets[:1]
    cut = truncate_knowledge(snippets, tiny_tokenizer, n_first + 2)
    assert len(cut) == 2 and len(tiny_tokenizer(cut[1], add_special_tokens=False)["input_ids"]) == 2


def test_prompt_modes():
    record = make_records(2)[1]
    fmt = PromptFormat()
    assert fmt.scoring_prompt(record, None) == record.question
    assert fmt.scoring_prompt(record, record.knowledge).startswith(record.knowledge[0])


def test_raw_prompt_is_the_papers(tiny_tokenizer):
    """The raw format (the default) is unchanged: the bare question, options after a space."""
    record = make_records(2)[1]
    fmt = PromptFormat()
    assert build_prompt(fmt, record, None) == (record.question, " ")
    assert build_prompt(fmt, record, record.knowledge, "raw", tiny_tokenizer) == (
        fmt.scoring_prompt(record, record.knowledge), " ")
    assert OptionScorer(None, tiny_tokenizer, FP32).prompt(record) == (record.question, " ")


def test_chat_prompt_uses_the_template(tiny_tokenizer):
    record = make_records(2)[1]
    prompts = PromptFormat()
    closed = build_prompt(prompts, record, None, "chat", tiny_tokenizer)
    assert closed.text == f"<|im_start|>user\n{record.question}<|im_end|>\n<|im_start|>assistant\n"
    assert closed.answer_prefix == ""
    with_docs = build_prompt(prompts, record, record.knowledge, "chat", tiny_tokenizer)
    user = documents_prompt(record.question, record.knowledge)
    assert "<DOCUMENT>" in user and user.endswith(f"Question: {record.question}")
    assert with_docs.text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    # the template's markers are tokenized as special tokens (one id each), not as bytes
    prefix, options = encode_options(tiny_tokenizer, closed.text, record.options, closed.answer_prefix)
    start, end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert prefix[0] == start and prefix.count(start) == 2 and prefix.count(end) == 1
    assert prefix[-len(tiny_tokenizer("assistant\n", add_special_tokens=False)["input_ids"]) - 1] == start
    assert options == [tiny_tokenizer(o, add_special_tokens=False)["input_ids"] for o in record.options]


@pytest.mark.parametrize("with_knowledge", [False, True])
def test_chat_option_is_scored_as_the_assistant_reply(tiny_model, tiny_tokenizer, with_knowledge):
    """One forward pass over the templated conversation whose assistant turn is the option
    (cut before the end-of-turn) gives the scorer's summed log-prob of that option."""
    record = make_records(2)[1]
    scorer = OptionScorer(tiny_model, tiny_tokenizer, FP32, fmt="chat")
    knowledge = scorer.knowledge(record) if with_knowledge else None
    user = documents_prompt(record.question, knowledge) if with_knowledge else record.question
    scores = {impl: OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation=impl, fmt="chat")
              .score(record, knowledge) for impl in ("shared_prefix", "reference")}
    prompt_ids = tiny_tokenizer(scorer.prompt(record, knowledge).text, add_special_tokens=False)["input_ids"]
    for i, option in enumerate(record.options):
        full = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": option}],
            tokenize=False, continue_final_message=True)
        assert full.endswith("<|im_start|>assistant\n" + option)
        ids = tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
        n = len(ids) - len(prompt_ids)
        assert ids[:len(prompt_ids)] == prompt_ids and n == scores["reference"].n_tokens[i]
        assert ids[len(prompt_ids):] == tiny_tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = tiny_model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # [s, v]
        expected = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        for impl, result in scores.items():
            assert result.logprob_sum[i] == pytest.approx(expected, abs=1e-4), impl


def test_answer_stem():
    assert answer_stem("Quote ##begin_quote##x##end_quote##. <ANSWER>: Paris, surely") == (
        "Quote ##begin_quote##x##end_quote##. <ANSWER>:")
    assert answer_stem("It is Paris.  ") == "It is Paris.\n<ANSWER>:"
    assert answer_stem("") == "<ANSWER>:"


def test_raft_prompt_is_the_training_prompt_then_the_reasoning(tiny_tokenizer):
    """raft-format scoring asks in the words RAFT trains on and scores each option, after a
    space, where the model's reasoning wrote <ANSWER>:."""
    from kembed.methods import raft

    record = make_records(2)[1]
    docs = tuple(record.knowledge)
    with pytest.raises(ValueError, match="reasoning"):
        build_prompt(PromptFormat(), record, docs, "raft", tiny_tokenizer)
    prompt = build_prompt(PromptFormat(), record, docs, "raft", tiny_tokenizer, reasoning="Look. <ANSWER>: B tail")
    user = raft.user_prompt(record, list(docs))
    assert user == raft_prompt(record.question, docs) and user.endswith(RAFT_INSTRUCTION)
    assert prompt.text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\nLook. <ANSWER>:"
    assert prompt.answer_prefix == " "


def test_raft_format_scores_after_what_the_model_wrote(tiny_model, tiny_tokenizer):
    """score_records in the raft format generates each question's reasoning greedily (recorded
    in the sample) and scores the options after it, as scoring that reasoning directly does."""
    from kembed.evaluate import score_records
    from kembed.generation import LocalGenerator

    records = make_records(3)
    scorer = OptionScorer(tiny_model, tiny_tokenizer, FP32, fmt="raft")
    calls = []
    samples = score_records(scorer, records, "oracle-context", progress=calls.append, reasoning_tokens=12)
    assert sum(calls) == 2 * len(records)  # written, then scored
    knowledge = [scorer.knowledge(r) for r in records]
    written = LocalGenerator(tiny_model, tiny_tokenizer, FP32, max_new_tokens=12).generate(
        [raft_prompt(r.question, k) for r, k in zip(records, knowledge)])
    for sample, record, k, text in zip(samples, records, knowledge, written):
        assert sample["reasoning"] == text
        direct = scorer.score(record, k, text)
        assert sample["scores"]["sum"] == pytest.approx(direct.scores("sum"), abs=1e-5)


def test_format_validation(tiny_model, tiny_tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="unknown scoring format 'bogus'"):
        OptionScorer(tiny_model, tiny_tokenizer, FP32, fmt="bogus")
    with pytest.raises(ValueError, match="raw, chat, raft"):
        build_prompt(PromptFormat(), make_records(1)[0], None, "bogus", tiny_tokenizer)
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None)
    OptionScorer(tiny_model, tiny_tokenizer, FP32)  # raw needs no template
    for fmt in ("chat", "raft"):
        with pytest.raises(ModelError, match="no chat template"):
            OptionScorer(tiny_model, tiny_tokenizer, FP32, fmt=fmt)


def test_results_table_shows_the_format():
    from rich.console import Console

    from kembed.evaluate import results_table

    base = {"model": "m", "domain": "d", "split": "test", "n": 4, "accuracy": dict.fromkeys(("token_mean", "sum", "char_norm"), 0.5),
            "ci95": dict.fromkeys(("token_mean", "sum", "char_norm"), [0.25, 0.75])}
    raw = {**base, "mode": "closed-book", "format": "raw"}
    old = {**base, "mode": "oracle-context"}  # written before formats existed: raw
    chat = {**base, "mode": "retrieved-context", "format": "chat", "index": "bm25", "top_k": 3}

    def render(rows):
        console = Console(width=250, record=True)
        console.print(results_table(rows))
        return console.export_text()

    assert "raw" not in render([raw, old]) and "chat" not in render([raw, old])
    text = render([raw, old, chat])
    assert "closed-book, raw" in text and "oracle-context, raw" in text
    assert "retrieved-context (bm25, k=3), chat" in text


def test_cli_eval_format(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kembed.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    monkeypatch.chdir(tmp_path)  # the default output directory goes under runs/
    result = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--precision", "fp32",
                    "--device", "cpu", "--mode", "oracle-context", "--format", "chat", "--limit", 2)
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.startswith("eval-current-events-test-oracle-context-chat-")
    summary = json.loads((out / "results.json").read_text())
    assert summary["format"] == "chat" and summary["mode"] == "oracle-context" and summary["n"] == 2
    raw = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--precision", "fp32",
                 "--device", "cpu", "--limit", 2, "--output", tmp_path / "raw")
    assert raw.exit_code == 0, raw.output
    assert json.loads((tmp_path / "raw" / "results.json").read_text())["format"] == "raw"
    bad = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--format", "bogus",
                 "--output", tmp_path / "bad")
    assert bad.exit_code == 2 and "unknown --format 'bogus'" in bad.output and "raw, chat" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
