"""RAFT (mixture, distractors, targets) and SimRAG (candidates, questions, round-trip filter),
on tiny inputs with exact expected outputs; the teacher / generator back-ends."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import make_records
from kembed.errors import DataError, KembedError
from kembed.generation import LocalGenerator, OpenAIGenerator
from kembed.methods import raft, simrag
from kembed.models import Placement
from kembed.records import QARecord


class FakeIndex:
    """Ranks documents by shared words with the query (what BM25 would find here)."""

    def __init__(self, documents):
        self.documents = documents

    def search(self, query, k):
        scored = sorted(range(len(self.documents)), key=lambda i: -len(raft.words(query) & raft.words(self.documents[i])))
        return [(i, 1.0, self.documents[i]) for i in scored[:k]]


DOCS = [f"Document {i} is about topic {i}." for i in range(20)] + ["The Eiffel Tower stands in Paris near the Seine."]


@pytest.mark.parametrize("p", [0.0, 0.4, 0.8, 1.0])
def test_raft_mixture_honours_p_and_k(p):
    records = make_records(10)
    cfg = raft.Config(p=p, k=3, distractors="random")
    examples = raft.build_examples(records, cfg, DOCS, seed=0)
    assert sum(e["has_oracle"] for e in examples) == round(p * 10)
    for e, r in zip(examples, records):
        oracle = raft.oracle_documents(r, 1)
        assert len(e["documents"]) == 3 + (1 if e["has_oracle"] else 0)
        assert (oracle[0] in e["documents"]) == e["has_oracle"]
        assert e["builder"] == "extractive"


def test_raft_record_without_knowledge_has_no_oracle():
    record = QARecord("q", "toy", "train", "Q?", ("a", "b"), ("A", "B"), 0, ())
    example = raft.build_examples([record], raft.Config(p=1.0, k=2, distractors="random"), DOCS, seed=0)[0]
    assert not example["has_oracle"] and len(example["documents"]) == 2


def test_raft_retrieved_distractors_are_hard_negatives_without_the_oracle():
    record = QARecord("q1", "toy", "train", "Where does the Eiffel Tower stand?", ("Paris", "Rome"), ("A", "B"), 0,
                      ("The Eiffel Tower stands in Paris near the Seine.",))
    docs = raft.choose_distractors(record, list(record.knowledge), 2, DOCS, random.Random(0), FakeIndex(DOCS))
    assert len(docs) == 2 and record.knowledge[0] not in docs


def test_raft_shuffles_document_order():
    records = make_records(30)
    examples = raft.build_examples(records, raft.Config(p=1.0, k=3, distractors="random"), DOCS, seed=0)
    positions = {e["documents"].index(e["oracle"][0]) for e in examples}
    assert len(positions) > 1


def test_raft_extractive_target_quotes_the_best_sentences():
    record = QARecord("q", "toy", "train", "Which planet is closest to the Sun?", ("Venus", "Mercury"), ("A", "B"), 1,
                      ("Venus is hot. Mercury is the planet closest to the Sun. Mars is red.",))
    target = raft.extractive_target(record, list(record.knowledge), 1)
    assert target == ("##Reason: The context says ##begin_quote##Mercury is the planet closest to the Sun."
                      "##end_quote## So the answer is Mercury.\n<ANSWER>: Mercury")


def test_raft_teacher_replaces_targets_and_is_recorded():
    class Teacher:
        name = "fake"

        def generate(self, prompts):
            return ["It says so.", "Quoted. <ANSWER>: x"][: len(prompts)]

    records = make_records(2)
    examples = raft.build_examples(records, raft.Config(k=1, distractors="random"), DOCS, seed=0)
    raft.apply_teacher(examples, records, Teacher())
    assert examples[0]["target"] == f"It says so.\n<ANSWER>: {records[0].answer}"
    assert examples[1]["target"] == "Quoted. <ANSWER>: x"
    assert {e["builder"] for e in examples} == {"teacher:fake"}


def test_raft_config_checks():
    with pytest.raises(ValueError):
        raft.Config(p=1.5)
    with pytest.raises(ValueError):
        raft.Config(target="teacher")


def test_simrag_candidates_must_occur_in_the_document():
    doc = "In 2024 the FAA grounded the Boeing 737 MAX 9 after the Alaska Airlines incident."
    reply = "1. Boeing 737 MAX 9\n- FAA\n* Delta Air Lines\n2024\nFAA\nA ground"
    assert simrag.parse_candidates(reply, doc, 5) == ["Boeing 737 MAX 9", "FAA", "2024"]
    assert simrag.parse_candidates(reply, doc, 1) == ["Boeing 737 MAX 9"]


def test_simrag_round_trip_filter():
    index = FakeIndex(DOCS)
    kept, retrieved = simrag.round_trip(index, "Where does the Eiffel Tower stand?", "Paris", 1)
    assert kept and retrieved == [20]
    kept, _ = simrag.round_trip(index, "Which topic is document 3 about?", "Paris", 2)
    assert not kept


def test_simrag_training_pairs_per_type():
    rng = random.Random(0)
    assert simrag.training_pair("short_answer", "Q?", "Paris", ["Rome"], rng) == [{"prompt": "Q?", "target": "Paris"}]
    mc = simrag.training_pair("multiple_choice", "Q?", "Paris", ["Rome", "Oslo", "Bern", "Lima"], rng)[0]
    assert mc["target"] == "Paris" and mc["prompt"].count("\n") == 4 and "Paris" in mc["prompt"]
    claims = simrag.training_pair("claim_verification", "The tower is in Paris.", "Paris", ["Rome"], rng)
    assert claims == [{"prompt": "True or false? The tower is in Paris.", "target": "True"},
                      {"prompt": "True or false? The tower is in Rome.", "target": "False"}]


def test_simrag_generate_pairs_with_a_scripted_model():
    class Scripted:
        def generate(self, prompts, progress=None):
            out = []
            for p in prompts:
                if p.startswith("Document:") and "List" in p:
                    out.append("Paris\nSeine\nLondon")  # London is not in the document
                elif "true sentence" in p:
                    out.append("The Eiffel Tower is in Paris.")
                else:
                    out.append("Where does the Eiffel Tower stand?\nextra line")
            return out

    cfg = simrag.Config(answers_per_document=2, filter_top_k=1)
    pairs = simrag.generate_pairs(Scripted(), FakeIndex(DOCS), [DOCS[20]], cfg, random.Random(0))
    assert {p["answer"] for p in pairs} == {"Paris", "Seine"}
    assert {p["type"] for p in pairs} == set(simrag.QUESTION_TYPES)
    assert all(p["question"] == "Where does the Eiffel Tower stand?" for p in pairs if p["type"] != "claim_verification")
    paris = [p for p in pairs if p["answer"] == "Paris" and p["type"] == "short_answer"][0]
    assert paris["kept"] and paris["retrieved"] == [20]


def test_simrag_stage1_files(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"instruction": "Add", "input": "1 and 2", "output": "3"}\n\n{"prompt": "Hi", "response": "Hello"}\n')
    assert simrag.load_stage1([str(good)]) == [{"prompt": "Add\n\n1 and 2", "target": "3"}, {"prompt": "Hi", "target": "Hello"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "Add"}\n')
    with pytest.raises(DataError, match="b.jsonl: record 0"):
        simrag.load_stage1([str(bad)])


def test_local_generator_runs(tiny_model, tiny_tokenizer):
    gen = LocalGenerator(tiny_model, tiny_tokenizer, Placement("cpu", "fp32"), max_new_tokens=3, batch_size=2)
    replies = gen.generate(["Where is Paris?", "Hi", "Which planet?"])
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)


def test_openai_compatible_teacher_on_loopback():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            reply = json.dumps({"choices": [{"message": {"content": "quoted <ANSWER>: Paris"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        gen = OpenAIGenerator(f"http://127.0.0.1:{server.server_port}/v1", "teacher-model", timeout=5)
        assert gen.generate(["Explain."]) == ["quoted <ANSWER>: Paris"]
        path, body, _ = seen[0]
        assert path == "/v1/chat/completions" and body["model"] == "teacher-model"
        assert body["messages"] == [{"role": "user", "content": "Explain."}]
    finally:
        server.shutdown()
    with pytest.raises(KembedError, match="teacher endpoint"):
        OpenAIGenerator("http://127.0.0.1:9/v1", "m", timeout=2).generate(["x"])
