"""Tests for kembed.retrieval (BM25, dense, hybrid, the on-disk cache) and retrieved-context eval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kembed import retrieval
from kembed.cli import app
from kembed.errors import KembedError
from kembed.retrieval import RRF_K, DomainIndex, build_index, domain_documents, index_dir

DOCS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Mercury is the planet closest to the Sun.",
    "Penicillin blocks the synthesis of the bacterial cell wall.",
    "The court held that the contract was void for lack of consideration.",
    "Photosynthesis turns light, water and carbon dioxide into sugar in plant leaves.",
    "The Great Wall of China is thousands of kilometres long.",
]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("KEMBED_CACHE_DIR", str(path))
    return path


def test_import_is_lazy():
    code = ("import sys, kembed.retrieval; "
            "bad = {'torch', 'sentence_transformers', 'bm25s', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bm25_finds_the_obvious_document():
    index = build_index("toy", "bm25", documents=DOCS)
    hits = index.search("Which planet is closest to the Sun?", k=3)
    assert hits[0][0] == 1 and hits[0][2] == DOCS[1] and hits[0][1] > 0
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    assert [h[0] for h in index.search("Where is the Eiffel Tower?", k=1)] == [0]


def test_bm25_returns_only_matching_documents():
    index = DomainIndex("bm25", DOCS)
    assert index.search("zebra xylophone", k=3) == []  # no shared word
    assert index.search("the of and", k=3) == []  # stopwords only
    assert index.search("", k=3) == []
    assert len(index.search("wall", k=10)) == 2  # "cell wall" and "Great Wall": only documents that match


def test_search_many_equals_search_and_validates_arguments():
    index = DomainIndex("bm25", DOCS)
    queries = ["Where is the Eiffel Tower?", "What does penicillin block?", "nothing matches zzz"]
    assert index.search_many(queries, k=2) == [index.search(q, k=2) for q in queries]
    assert index.search_many([], k=2) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search("tower", k=0)
    with pytest.raises(TypeError):
        index.search_many("tower", k=1)
    with pytest.raises(ValueError, match="unknown index kind"):
        DomainIndex("tfidf", DOCS)


def test_dense_finds_a_paraphrase():
    index = build_index("toy", "dense", documents=DOCS)
    query = "Which antibiotic stops germs from building their outer walls?"
    hits = index.search(query, k=3)
    assert hits[0][0] == 2
    assert len(hits) == 3 and all(-1.0 <= h[1] <= 1.0 for h in hits)
    assert DomainIndex("bm25", DOCS).search(query, k=1) == []  # no shared word: BM25 cannot find it
    assert index.search("How do leaves make food from sunlight?", k=1)[0][0] == 4
    assert index.embeddings.shape == (len(DOCS), 384)


def test_hybrid_is_reciprocal_rank_fusion_of_bm25_and_dense():
    hybrid = build_index("toy", "hybrid", documents=DOCS)
    bm25, dense = DomainIndex("bm25", DOCS), DomainIndex("dense", DOCS, embeddings=hybrid.embeddings)
    query = "What does penicillin do to bacteria?"
    expected = [0.0] * len(DOCS)
    for ranking in (bm25.search(query, k=len(DOCS)), dense.search(query, k=len(DOCS))):
        for rank, (doc, _, _) in enumerate(ranking, 1):
            expected[doc] += 1 / (RRF_K + rank)
    hits = hybrid.search(query, k=len(DOCS))
    assert len(hits) == len(DOCS)  # dense ranks every document, so the fusion does too
    assert hits[0][0] == 2 and hits[0][1] == pytest.approx(2 / (RRF_K + 1))
    for doc, score, text in hits:
        assert score == pytest.approx(expected[doc]) and text == DOCS[doc]
    # a document only the dense ranking finds still comes back from the hybrid
    paraphrase = "Which antibiotic stops germs from building their outer walls?"
    assert hybrid.search(paraphrase, k=1)[0][0] == 2


def test_cache_hit_loads_without_rebuilding(monkeypatch, cache):
    first = {kind: build_index("toy", kind, documents=DOCS) for kind in ("bm25", "dense")}
    assert not any(i.from_cache for i in first.values())
    assert first["bm25"].path == index_dir("toy", "bm25", DOCS)
    assert first["bm25"].path.parent == cache / "indexes" / "toy"

    def fail(*_):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(retrieval, "_build_bm25", fail)
    monkeypatch.setattr(retrieval, "_embed_documents", fail)
    for kind, before in first.items():
        again = build_index("toy", kind, documents=DOCS)
        assert again.from_cache and again.path == before.path
        query = ["Where is the Eiffel Tower?"]
        assert again.search_many(query, 3) == before.search_many(query, 3)


def test_changed_documents_rebuild_and_remove_the_stale_index(monkeypatch):
    old = build_index("toy", "bm25", documents=DOCS)
    changed = DOCS[:-1] + ["The Great Wall of China is very long."]
    calls = []
    real = retrieval._build_bm25
    monkeypatch.setattr(retrieval, "_build_bm25", lambda docs: calls.append(len(docs)) or real(docs))
    new = build_index("toy", "bm25", documents=changed)
    assert calls == [len(DOCS)] and not new.from_cache and new.path != old.path
    assert not old.path.exists() and new.path.exists()
    assert new.search("very long", k=1)[0][2] == changed[-1]
    assert build_index("toy", "bm25", documents=changed).from_cache


def test_unreadable_cache_is_rebuilt(monkeypatch):
    built = build_index("toy", "bm25", documents=DOCS)
    (built.path / "meta.json").write_text("{not json")
    again = build_index("toy", "bm25", documents=DOCS)
    assert not again.from_cache and json.loads((built.path / "meta.json").read_text())["n_documents"] == len(DOCS)
    for stray in built.path.parent.iterdir():
        assert not stray.name.endswith(".partial")


def test_build_index_errors():
    with pytest.raises(KembedError, match="unknown index kind"):
        build_index("toy", "tfidf", documents=DOCS)
    with pytest.raises(KembedError, match="invalid domain name"):
        build_index("../x", "bm25", documents=DOCS)
    with pytest.raises(KembedError, match="no documents"):
        build_index("toy", "bm25", documents=[])


def test_domain_documents_knowledge_base_or_unique_train_snippets(data_dir):
    assert domain_documents("current-events") == ["The Eiffel Tower is in Paris.", "Mercury is closest to the Sun."]
    usmle = data_dir / "USMLE"
    usmle.mkdir()
    opts = {"A": "x", "B": "y"}
    train = [{"question": "q1", "options": opts, "answer": "x", "ctx": "snippet one\nsnippet two"},
             {"question": "q2", "options": opts, "answer": "y", "ctx": "snippet two\nsnippet three"}]
    (usmle / "USMLE_val.json").write_text(json.dumps(train))
    (usmle / "USMLE_test.jsonl").write_text(json.dumps({"question": "q", "options": opts, "answer": "x",
                                                        "ctx": "TEST-ONLY snippet"}) + "\n")
    assert domain_documents("medical") == ["snippet one", "snippet two", "snippet three"]
    (usmle / "USMLE_val.json").write_text(json.dumps([{"question": "q1", "options": opts, "answer": "x"}]))
    with pytest.raises(KembedError, match="no documents to index"):
        domain_documents("medical")


def test_index_build_command(data_dir):
    first = invoke("index", "build", "--domain", "current-events")
    assert first.exit_code == 0, first.output
    assert "bm25 index of current-events: 2 documents, built" in first.output
    second = invoke("index", "build", "--domain", "current-events", "--kind", "bm25")
    assert "loaded from the cache" in second.output
    bad = invoke("index", "build", "--domain", "current-events", "--kind", "tfidf")
    assert bad.exit_code == 2 and "unknown index kind" in bad.output


def test_eval_retrieved_context(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    result = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--output", out,
                    "--precision", "fp32", "--mode", "retrieved-context", "--top-k", "1", "--index", "bm25")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "retrieved-context" and summary["index"] == "bm25" and summary["top_k"] == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == summary["n"] == 4
    # "Where is the Eiffel Tower?" retrieves knowledge-base line 0, "Which planet is closest..." line 1
    assert samples[0]["retrieved"][0][0] == 0 and samples[1]["retrieved"][0][0] == 1
    assert all(len(s.get("retrieved", [])) <= 1 for s in samples)

    closed = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--output", tmp_path / "cb",
                    "--precision", "fp32", "--limit", "1")
    assert json.loads((tmp_path / "cb" / "results.json").read_text())["index"] is None
    for bad, message in ((["--index", "tfidf"], "unknown --index"), (["--top-k", "0"], "--top-k")):
        r = invoke("eval", "--domain", "current-events", "--model", tiny_model_dir, "--output", tmp_path / "x",
                   "--mode", "retrieved-context", *bad)
        assert r.exit_code == 2 and message in r.output, r.output
    assert closed.exit_code == 0


def test_score_records_retrieved_context(tiny_model, tiny_tokenizer):
    from conftest import make_records
    from kembed.evaluate import score_records
    from kembed.models import Placement
    from kembed.scoring import OptionScorer

    scorer = OptionScorer(tiny_model, tiny_tokenizer, Placement("cpu", "fp32"))
    records = make_records(2)
    with pytest.raises(ValueError, match="retrieved"):
        score_records(scorer, records, "retrieved-context")
    hits = {records[0].id: [(3, 1.5, "The Eiffel Tower is in Paris.")], records[1].id: ["Mercury is closest."]}
    samples = score_records(scorer, records, "retrieved-context", retrieved=hits)
    assert samples[0]["retrieved"] == [[3, 1.5]] and "retrieved" not in samples[1]
    with_context = scorer.score(records[0], ("The Eiffel Tower is in Paris.",)).scores("token_mean")
    assert samples[0]["scores"]["token_mean"] == [round(v, 6) for v in with_context]
