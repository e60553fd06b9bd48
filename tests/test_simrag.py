"""SimRAG: Stage I built from the training records, Stage II trained on (question, retrieved
documents, answer), and the low-yield warning; on made-up records and the tiny model."""

import json
import random
import re

from typer.testing import CliRunner

from kembed.cli import app
from kembed.methods import simrag
from kembed.prompts import cut_tokens, documents_prompt
from kembed.records import QARecord


def test_stage1_examples_from_records():
    cfg = simrag.Config(answers_per_document=2)
    question = "Which planet is closest to the Sun?"
    found = QARecord("r1", "toy", "train", question, ("Venus", "Mercury"), ("A", "B"), 1,
                     ("MERCURY is the planet closest to the Sun.", "Venus is second.", "Mercuryville is a town."))
    missing = QARecord("r2", "toy", "train", "Where is the tower?", ("Rome", "Paris"), ("A", "B"), 0,
                       ("The tower is in Paris.",))
    bare = QARecord("r3", "toy", "train", "Q?", ("a", "b"), ("A", "B"), 0, ())
    examples = simrag.stage1_examples([found, missing, bare], cfg)
    snippet = found.knowledge[0]
    assert [(e["task"], e["id"]) for e in examples] == [
        ("context_qa", "r1"), ("answer_extraction", "r1"), ("question_generation", "r1"), ("context_qa", "r2")]
    assert examples[0]["prompt"] == documents_prompt(question, list(found.knowledge))
    assert examples[0]["target"] == "Mercury"
    assert examples[1]["prompt"] == simrag.extraction_prompt(snippet, 2)
    assert examples[1]["target"] == "MERCURY"  # the snippet's casing; "Mercuryville" is no whole-word match
    assert examples[2]["prompt"] == simrag.question_prompt(snippet, "MERCURY", "short_answer")
    assert examples[2]["target"] == question
    assert examples[3] == {"task": "context_qa", "id": "r2", "prompt": documents_prompt("Where is the tower?",
                           ["The tower is in Paris."]), "target": "Rome"}
    # the answer is looked for in the cut snippet: cut before it, no extraction / generation
    cut = simrag.stage1_examples([found], cfg, truncate=lambda s: s[-12:])
    assert [e["task"] for e in cut] == ["context_qa"]
    assert cut[0]["prompt"] == documents_prompt(question, [s[-12:] for s in found.knowledge])


class FakeIndex:
    """Ranks documents by shared lower-cased words with the query, best first."""

    def __init__(self, documents):
        self.documents = documents

    def search(self, query, k):
        def shared(i):
            return len(set(re.findall(r"\w+", query.lower())) & set(re.findall(r"\w+", self.documents[i].lower())))

        ranked = sorted((i for i in range(len(self.documents)) if shared(i)), key=lambda i: -shared(i))
        return [(i, 1.0, self.documents[i]) for i in ranked[:k]]


class Scripted:
    """A generator that extracts fixed answers and asks the document's own sentence back."""

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, prompts, progress=None):
        replies = []
        for p in prompts:
            document = re.match(r"Document: (.*?)\n\n", p, re.S).group(1)
            replies.append("Paris\nMercury\nSun" if "List" in p else document)
        return replies


def test_generate_pairs_prompt_holds_the_retrieved_documents_cut_in_order():
    docs = ["The Eiffel Tower is in Paris.", "Paris is the capital of France.", "Mercury is closest to the Sun."]
    cfg = simrag.Config(answers_per_document=1, filter_top_k=2, question_types=["short_answer"])
    pairs = simrag.generate_pairs(Scripted(), FakeIndex(docs), [docs[0]], cfg, random.Random(0),
                                  truncate=lambda d: d[:15])
    assert len(pairs) == 1 and pairs[0]["kept"] and pairs[0]["retrieved"] == [0, 1]
    assert pairs[0]["training_prompt"] == ("<DOCUMENT>The Eiffel Towe</DOCUMENT>\n<DOCUMENT>Paris is the ca"
                                           "</DOCUMENT>\n\nQuestion: The Eiffel Tower is in Paris.")


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_simrag_run_trains_stage2_on_retrieved_documents_and_warns_on_low_yield(
        data_dir, tiny_model_dir, tmp_path, monkeypatch):
    from kembed.models import load_tokenizer
    from kembed.retrieval import domain_documents

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("kembed.generation.LocalGenerator", Scripted)
    fitted = []
    real_fit = simrag.fit_lm

    def recording_fit(ctx, examples, epochs, label):
        fitted.append((label, [ctx.tokenizer.decode(e["input_ids"]) for e in examples]))
        return real_fit(ctx, examples, epochs, label)

    monkeypatch.setattr(simrag, "fit_lm", recording_fit)
    out = tmp_path / "run"
    args = ["train", "simrag", "--output", out, f"model={tiny_model_dir}", "limit=4", "validation=1",
            "precision=fp32", "train.batch_size=4", "eval.limit=1", "simrag.documents=2", "simrag.min_kept_pairs=1000"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "state.json").read_text()) == {"iterations_done": 2}

    # Stage I: from the 4 training records (each has its answer in one snippet), then Stage II
    events = _events(out)
    stage1 = next(e for e in events if e["event"] == "simrag_stage1")
    assert stage1["per_task"] == {"context_qa": 4, "answer_extraction": 4, "question_generation": 4, "file": 0}
    assert stage1["examples"] == 12
    assert [label for label, _ in fitted] == ["stage I", "stage II"]
    names = [e["event"] for e in events]
    assert names.index("iteration_end") < names.index("simrag_filter")

    # Stage II: every kept pair's prompt holds its retrieved documents, and that is what trains
    tokenizer = load_tokenizer(str(tiny_model_dir))
    documents = domain_documents("current-events", data_dir)
    kept = [json.loads(line) for line in (out / "simrag_kept.jsonl").read_text().splitlines()]
    assert kept
    for pair in kept:
        assert pair["retrieved"]
        for j in pair["retrieved"]:
            assert f"<DOCUMENT>{cut_tokens(tokenizer, documents[j], 160)}</DOCUMENT>" in pair["training_prompt"]
        assert pair["training_prompt"].endswith(f"Question: {pair['prompt']}")
        assert any(pair["training_prompt"] in text for text in fitted[1][1])
    assert len(fitted[1][1]) == len(kept) + 12

    # low yield: flagged in metrics and said loudly
    filt = next(e for e in events if e["event"] == "simrag_filter")
    assert filt["below_min_kept"] is True and filt["min_kept_pairs"] == 1000 and filt["kept"] == len(kept)
    warning = next(e for e in events if e["event"] == "warning")
    assert warning["kept"] == len(kept) and "min_kept_pairs" in warning["message"]
    assert "WARNING: SimRAG kept only" in " ".join(result.output.split())


def test_stage1_data_caps_the_record_examples_and_adds_files(tmp_path):
    from conftest import make_records

    extra = tmp_path / "general.jsonl"
    extra.write_text('{"instruction": "Say hi", "output": "Hi"}\n')
    records = make_records(6)
    full = simrag.stage1_data(records, simrag.Config(stage1_files=[str(extra)]), seed=0)
    assert [e["task"] for e in full].count("context_qa") == 6 and len(full) == 6 * 3 + 1
    assert full[-1] == {"task": "file", "prompt": "Say hi", "target": "Hi"}
    capped = simrag.stage1_data(records, simrag.Config(stage1_max_examples=5, stage1_files=[str(extra)]), seed=0)
    assert len(capped) == 6 and capped[-1]["task"] == "file" and all(e in full for e in capped)
    again = simrag.stage1_data(records, simrag.Config(stage1_max_examples=5, stage1_files=[str(extra)]), seed=0)
    assert capped == again
    assert simrag.stage1_data(records, simrag.Config(stage1_records=False), seed=0) == []
