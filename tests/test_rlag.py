"""RLAG: the loss against a direct transcription of the formula, every switch's effect, the
example builder, sampling and one training step."""

import math

import pytest
import torch

from conftest import make_records
from kembed.config import ConfigError, resolve_config
from kembed.methods import rlag
from kembed.methods.common import chat_answer_ids
from kembed.methods.rlag import Config, build_example, knowledge_rows, make_collate, make_loss_fn, rlag_loss
from kembed.models import Placement
from kembed.prompts import PromptFormat
from kembed.scoring import OptionScores

LZ = [-2.0, -1.0, -3.5, -0.5]
LW = [-0.1, -0.8, -2.0, -0.05]
LL = [-6.0, -1.5, -0.3, -4.0]
BETA_D = [0.2, 0.5, 0.2, 0.2]
BETA_A = [0.5, 0.0, 0.5, 0.5]


def transcription(cfg: Config, clip="before", terms=("knowledge", "chosen", "rejected"), gamma=None):
    """The loss, written out element by element from methods.md / the paper figure."""
    gamma = cfg.gamma if gamma is None else gamma
    out = []
    for lz, lw, ll, bd, ba in zip(LZ, LW, LL, BETA_D, BETA_A):
        if clip == "before":
            chosen, rejected = ba * min(lw, -0.2), ba * max(ll, -5.0)
        elif clip == "after":
            chosen, rejected = min(ba * lw, -0.2), max(ba * ll, -5.0)
        else:
            chosen, rejected = ba * lw, ba * ll
        x = {"knowledge": bd * lz, "chosen": chosen, "rejected": -rejected}
        z = sum(x[t] for t in terms) - gamma
        out.append(-math.log(1 / (1 + math.exp(-z))))
    return out


def loss_of(cfg):
    t = torch.tensor
    return rlag_loss(t(LZ), t(LW), t(LL), t(BETA_D), t(BETA_A), cfg).tolist()


def test_default_loss_is_the_formula():
    cfg = Config()
    assert loss_of(cfg) == pytest.approx(transcription(cfg), abs=1e-6)


SWITCHES = {
    "no_rejected": dict(terms=("knowledge", "chosen")),
    "no_knowledge": dict(terms=("chosen", "rejected")),
    "no_gamma": dict(gamma=0.0),
    "no_clip": dict(clip="none"),
    "pure_chosen": dict(terms=("chosen",)),
    "pure_knowledge": dict(terms=("knowledge",)),
    "pure_rejected": dict(terms=("rejected",)),
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_ablation_switch_changes_the_loss_as_written(switch):
    cfg = Config(**{switch: True})
    assert loss_of(cfg) == pytest.approx(transcription(cfg, **SWITCHES[switch]), abs=1e-6)
    assert loss_of(cfg) != pytest.approx(loss_of(Config()), abs=1e-4)


def test_clip_after_beta_is_the_figure_variant():
    cfg = Config(clip_order="after_beta")
    assert loss_of(cfg) == pytest.approx(transcription(cfg, clip="after"), abs=1e-6)
    assert loss_of(cfg) != pytest.approx(loss_of(Config()), abs=1e-4)


def test_dynamic_and_fixed_beta():
    assert Config().betas(same=True) == (0.5, 0.0)
    assert Config().betas(same=False) == (0.2, 0.5)
    assert Config(fixed_beta=True).betas(same=True) == (0.2, 0.5)


def test_conflicting_switches_are_config_errors():
    with pytest.raises(ValueError):
        Config(pure_chosen=True, pure_rejected=True)
    with pytest.raises(ConfigError, match="rlag.gama"):
        resolve_config({"method": "rlag", "rlag": {"gama": 1}}, Config, "recipe.yaml")


def test_answer_span_template_vs_answer(tiny_tokenizer):
    ids, mask = chat_answer_ids(tiny_tokenizer, "Where is the tower?", "Paris", "answer")
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Paris"
    ids, mask = chat_answer_ids(tiny_tokenizer, "Where is the tower?", "Paris", "template")
    scored = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert scored == "<|im_start|>assistant\nParis<|im_end|>\n"
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>user\nWhere is the tower?")


def test_knowledge_rows_concat_and_per_snippet(tiny_tokenizer):
    snippets = ("Mercury is closest.", "Venus is second.")
    concat = knowledge_rows(tiny_tokenizer, snippets, "concat")
    per = knowledge_rows(tiny_tokenizer, snippets, "per_snippet")
    assert len(concat) == 1 and len(per) == 2 and concat[0] == per[0] + per[1]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert all(r[0] == bos and r[-1] == eos for r in per)


def _examples(tokenizer, cfg, same=(False, True, False)):
    records = make_records(3)
    examples = []
    for record, s in zip(records, same):
        chosen = record.answer_index
        rejected = chosen if s else (chosen + 1) % len(record.options)
        beta_D, beta_A = cfg.betas(s)
        pair = {"chosen_index": chosen, "rejected_index": rejected, "knowledge": list(record.knowledge),
                "beta_D": beta_D, "beta_A": beta_A}
        examples.append(build_example(tokenizer, record, pair, PromptFormat(), cfg))
    return examples


def _batch(tokenizer, cfg):
    return make_collate(tokenizer.pad_token_id)(_examples(tokenizer, cfg))


def _direct_loss(model, examples, cfg):
    """No batching, no padding, no skipping: every sequence scored alone, then the formula."""

    def mean_lp(ids, mask):
        ids = torch.tensor([ids])
        lp = model(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[0]
        m = torch.tensor(mask[1:], dtype=torch.float)
        return (lp * m).sum() / m.sum()

    lw = torch.stack([mean_lp(e["chosen_ids"], e["chosen_mask"]) for e in examples])
    ll = torch.stack([mean_lp(e["rejected_ids"], e["rejected_mask"]) for e in examples])
    lz = torch.stack([sum(mean_lp(r, [1] * len(r)) for r in e["knowledge_rows"]) for e in examples])
    beta_D = torch.tensor([e["beta_D"] for e in examples])
    beta_A = torch.tensor([e["beta_A"] for e in examples])
    return rlag_loss(lz, lw, ll, beta_D, beta_A, cfg).mean()


@pytest.mark.parametrize("options", [{}, {"clip_order": "after_beta"}, {"knowledge_logprob": "per_snippet"},
                                     {"answer_span": "answer"}, {"fixed_beta": True}])
def test_loss_fn_equals_direct_computation_and_gradient(tiny_model, tiny_tokenizer, options):
    cfg = Config(grad_norm_every=1, **options)
    examples = _examples(tiny_tokenizer, cfg)
    loss, metrics = make_loss_fn(cfg)(tiny_model, make_collate(tiny_tokenizer.pad_token_id)(examples))
    grads = torch.autograd.grad(loss, list(tiny_model.parameters()))
    direct = _direct_loss(tiny_model, examples, cfg)
    direct_grads = torch.autograd.grad(direct, list(tiny_model.parameters()))
    assert loss.item() == pytest.approx(direct.item(), abs=1e-5)
    for g, d in zip(grads, direct_grads):
        assert torch.allclose(g, d, atol=1e-5)
    rewards = {"reward_knowledge", "reward_chosen", "reward_rejected"}
    assert set(metrics) == rewards | {f"grad_norm_{t}" for t in ("knowledge", "chosen", "rejected")}
    reference, _ = make_loss_fn(cfg, rlag.mean_logprobs_reference)(tiny_model, make_collate(0)(examples))
    assert reference.item() == pytest.approx(direct.item(), abs=1e-5)  # the make-perf reference, full logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_padded_batch_leaves_no_attention_row_empty_and_scores_each_row_as_alone(tiny_model, tiny_tokenizer,
                                                                                  attn):
    """Padding positions attend to themselves (fused SDPA kernels give NaN for empty rows);
    each real row's mean log-prob and its gradient are those of the row alone, unpadded."""
    from kembed.tensors import padded_batch_mask

    tiny_model.set_attn_implementation(attn)
    batch = make_collate(tiny_tokenizer.pad_token_id)(_examples(tiny_tokenizer, Config()))
    ids, attention, mask = batch["knowledge_ids"], batch["knowledge_attention"], batch["knowledge_mask"]
    assert not attention.all()  # rows of different lengths
    four_d = padded_batch_mask(attention, tiny_model)
    allowed = four_d if four_d.dtype == torch.bool else four_d == 0
    assert allowed.shape == (len(ids), 1, ids.shape[1], ids.shape[1]) and allowed.any(-1).all()
    batched = rlag.mean_logprobs(tiny_model, ids, attention, mask)
    params = list(tiny_model.parameters())
    for i in range(len(ids)):
        real = attention[i].bool()
        alone = rlag.mean_logprobs(tiny_model, ids[i, real][None], attention[i, real][None], mask[i, real][None])
        assert batched[i].item() == pytest.approx(alone.item(), abs=1e-5)
        for g, d in zip(torch.autograd.grad(batched[i], params, retain_graph=True), torch.autograd.grad(alone, params)):
            assert torch.allclose(g, d, atol=1e-5)
    assert padded_batch_mask(torch.ones(2, 5, dtype=torch.long), tiny_model).shape == (2, 5)  # no padding: as is


def test_per_term_gradient_norms_add_up_and_show_saturation(tiny_model, tiny_tokenizer):
    """The terms' gradient shares sum to the loss gradient; a clipped term contributes nothing;
    the norms are logged every ``grad_norm_every`` micro-batches only."""
    cfg = Config(grad_norm_every=2, eps_rejected=-100.0)  # the tiny model's log-probs are below -5
    batch = _batch(tiny_tokenizer, cfg)
    params = list(tiny_model.parameters())
    loss_fn = make_loss_fn(cfg)
    loss, first = loss_fn(tiny_model, batch)
    assert first["grad_norm_knowledge"] > 0 and first["grad_norm_chosen"] > 0 and first["grad_norm_rejected"] > 0
    assert "grad_norm_chosen" not in loss_fn(tiny_model, batch)[1]  # second micro-batch: not measured
    assert "grad_norm_chosen" in loss_fn(tiny_model, batch)[1]  # third: measured again
    total = torch.autograd.grad(loss, params)
    # recompute the shares as gradients and add them up
    from kembed.methods.rlag import rlag_logits, rlag_terms

    lz, lw, ll = (torch.randn(3, requires_grad=True) for _ in range(3))
    terms = rlag_terms(lz, lw, ll, batch["beta_D"], batch["beta_A"], cfg)
    x = rlag_logits(terms, cfg)
    full = torch.autograd.grad(-torch.nn.functional.logsigmoid(x).mean(), (lz, lw, ll), retain_graph=True)
    shares = [torch.autograd.grad((-torch.sigmoid(-x.detach()) * t).mean(), (lz, lw, ll), retain_graph=True,
                                  allow_unused=True) for t in terms.values()]
    summed = [sum(s[i] if s[i] is not None else torch.zeros(3) for s in shares) for i in range(3)]
    for f, s in zip(full, summed):
        assert torch.allclose(f, s, atol=1e-6)
    assert sum(float((g ** 2).sum()) for g in total) > 0
    # a rejected log-prob below eps_rejected is clipped: its term has no gradient
    saturated = Config(grad_norm_every=1)  # the code's eps2 = -5: the tiny model's log-probs are below it
    assert make_loss_fn(saturated)(tiny_model, batch)[1]["grad_norm_rejected"] == 0.0


def test_per_snippet_knowledge_changes_the_loss(tiny_model, tiny_tokenizer):
    a = make_loss_fn(Config())(tiny_model, _batch(tiny_tokenizer, Config()))[0]
    cfg = Config(knowledge_logprob="per_snippet")
    b = make_loss_fn(cfg)(tiny_model, _batch(tiny_tokenizer, cfg))[0]
    assert a.item() != pytest.approx(b.item(), abs=1e-5)


def test_answer_span_changes_the_loss(tiny_model, tiny_tokenizer):
    a = make_loss_fn(Config())(tiny_model, _batch(tiny_tokenizer, Config()))[0]
    cfg = Config(answer_span="answer")
    b = make_loss_fn(cfg)(tiny_model, _batch(tiny_tokenizer, cfg))[0]
    assert a.item() != pytest.approx(b.item(), abs=1e-5)


class FixedScorer:
    """Augmented scores prefer option 0, naive scores prefer option 1."""

    placement = Placement("cpu", "fp32")

    def knowledge(self, record):
        return record.knowledge

    def score(self, record, knowledge):
        best = 0 if knowledge is not None else 1
        values = [-1.0 - (i != best) for i in range(len(record.options))]
        return OptionScores(values, [1] * len(values), [1] * len(values))

    def score_many(self, records, knowledge, progress=None):
        return [self.score(r, k) for r, k in zip(records, knowledge)]


def test_sampling_pairs_and_counts():
    records = make_records(3)  # gold indices 0, 1, 2
    pairs, counts = rlag.sample_pairs(FixedScorer(), records, Config())
    assert [(p["chosen_index"], p["rejected_index"]) for p in pairs] == [(0, 1)] * 3
    assert counts == {"records": 3, "chosen_correct": 1, "rejected_correct": 1, "chosen_failure": 1, "same": 0}
    assert all((p["beta_D"], p["beta_A"]) == (0.2, 0.5) for p in pairs)
    gold, counts = rlag.sample_pairs(FixedScorer(), records, Config(chosen_is_gold=True))
    assert [p["chosen_index"] for p in gold] == [0, 1, 2]
    assert gold[1]["same"] and (gold[1]["beta_D"], gold[1]["beta_A"]) == (0.5, 0.0)
    assert counts["chosen_correct"] == 3


def test_records_without_knowledge_are_inert():
    record = make_records(1)[0]
    bare = type(record)(record.id, record.domain, record.split, record.question, record.options, record.labels,
                        record.answer_index, ())
    pairs, _ = rlag.sample_pairs(FixedScorer(), [bare], Config())
    assert pairs[0]["chosen_index"] == pairs[0]["rejected_index"] and (pairs[0]["beta_D"], pairs[0]["beta_A"]) == (0, 0)


def test_split_chunks_is_seeded_and_complete():
    records = make_records(10)
    chunks = rlag.split_chunks(records, 3, seed=1)
    assert [len(c) for c in chunks] == [3, 3, 4]
    assert [len(c) for c in rlag.split_chunks(make_records(4), 3, seed=0)] == [1, 1, 2]
    assert sorted(r.id for c in chunks for r in c) == sorted(r.id for r in records)
    assert chunks == rlag.split_chunks(records, 3, seed=1) != rlag.split_chunks(records, 3, seed=2)
    in_file_order = rlag.split_chunks(records, 3, seed=1, shuffle=False)  # rlag.chunk_order: file
    assert [r.id for c in in_file_order for r in c] == [r.id for r in records]


def test_a_training_step_moves_the_weights(tiny_model, tiny_tokenizer):
    from kembed.config import TrainConfig
    from kembed.trainer import fit

    cfg = Config()
    records = make_records(4)
    pairs = [{"chosen_index": r.answer_index, "rejected_index": (r.answer_index + 1) % 3, "knowledge": list(r.knowledge),
              "beta_D": 0.2, "beta_A": 0.5} for r in records]
    examples = [build_example(tiny_tokenizer, r, p, PromptFormat(), cfg) for r, p in zip(records, pairs)]
    before = [p.detach().clone() for p in tiny_model.parameters()]
    logs = []
    fit(tiny_model, examples, make_collate(tiny_tokenizer.pad_token_id), make_loss_fn(cfg),
        TrainConfig(learning_rate=1e-2, batch_size=2, warmup_ratio=0.0), Placement("cpu", "fp32"),
        epochs=1, seed=0, on_log=lambda step, values: logs.append(values))
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    assert "reward_chosen" in logs[0] and "loss" in logs[0]


def test_chunk_fraction_trains_a_seeded_subset():
    from kembed.methods.rlag import trained_subset

    pairs = [{"id": str(i)} for i in range(10)]
    a = trained_subset(pairs, 0.8, seed=3)
    assert len(a) == 8 and a == trained_subset(pairs, 0.8, seed=3)
    assert a != trained_subset(pairs, 0.8, seed=4)
    assert trained_subset(pairs, 1.0, seed=3) == pairs
    assert len(trained_subset(pairs[:1], 0.5, seed=0)) == 1
    # the same records whatever order the pairs of a later pass come in (rlag.fixed_subset)
    assert {p["id"] for p in trained_subset(pairs[::-1], 0.8, seed=3)} == {p["id"] for p in a}


def test_reference_prompt_preset_has_instruction_options_and_knowledge():
    record = make_records(2)[1]
    reference = PromptFormat.model_validate({"preset": "reference"})
    chat = reference.chat_prompt(record, record.knowledge)
    assert "; ".join(record.options) in chat and record.knowledge[0] in chat and chat.endswith("Answer:")
    assert record.knowledge[0] not in reference.chat_prompt(record, None)
    sampling = reference.scoring_prompt(record, None)
    assert sampling.endswith(record.question) and len(sampling) > len(record.question)  # an instruction before it
    assert PromptFormat().scoring_prompt(record, None) == record.question  # bare: the paper's scoring prompt
    custom = PromptFormat.model_validate({"preset": "reference", "closed_book": "Q: {question}"})
    assert custom.scoring_prompt(record, None) == f"Q: {record.question}"  # an explicit template wins
