import pytest
import torch

from conftest import make_records
from kembed.models import Placement
from kembed.prompts import PromptFormat, truncate_knowledge
from kembed.scoring import OptionScorer, OptionScores, encode_options, logprob_sums_reference

FP32 = Placement("cpu", "fp32")


@pytest.mark.parametrize("with_knowledge", [False, True])
def test_shared_prefix_matches_reference(tiny_model, tiny_tokenizer, with_knowledge):
    fast = OptionScorer(tiny_model, tiny_tokenizer, FP32)
    slow = OptionScorer(tiny_model, tiny_tokenizer, FP32, implementation="reference")
    for record in make_records(6):
        knowledge = fast.knowledge(record) if with_knowledge else None
        a, b = fast.score(record, knowledge), slow.score(record, knowledge)
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        for scorer in ("token_mean", "sum", "char_norm"):
            assert a.predict(scorer) == b.predict(scorer)


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
