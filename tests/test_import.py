"""Tests for users' own domains: ``kembed data import`` and kembed.userdomains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kembed import userdomains
from kembed.cli import app
from kembed.data import (DOMAINS, fetch_data, get_domain, list_domains, load_knowledge_base, load_records, load_split,
                         user_domains_dir)
from kembed.errors import DataError
from kembed.retrieval import domain_documents

runner = CliRunner()

FACTS = [  # question, options, gold letter, the corpus document that answers it
    ("Where is the Eiffel Tower?", {"A": "Paris", "B": "Rome", "C": "Berlin"}, "A",
     "The Eiffel Tower stands in Paris, France."),
    ("Which planet is closest to the Sun?", {"A": "Venus", "B": "Mercury", "C": "Mars"}, "B",
     "Mercury is the planet closest to the Sun."),
    ("What does penicillin block?", {"A": "DNA synthesis", "B": "protein synthesis", "C": "cell wall synthesis"}, "C",
     "Penicillin blocks bacterial cell wall synthesis."),
    ("Who wrote Hamlet?", {"A": "Shakespeare", "B": "Dickens", "C": "Austen"}, "A",
     "Hamlet is a tragedy written by William Shakespeare."),
    ("What gas do plants absorb?", {"A": "Oxygen", "B": "Carbon dioxide", "C": "Helium"}, "B",
     "Plants absorb carbon dioxide for photosynthesis."),
]
CORPUS = [fact[3] for fact in FACTS] + ["The Danube flows into the Black Sea."]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def qa_records(n: int = 10, ctx: bool = True, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        question, options, letter, document = FACTS[i % len(FACTS)]
        record = {"idx": i, "question": question, "options": dict(options), "answer": options[letter],
                  "answer_idx": letter}
        if ctx:
            record["ctx"] = f"{document}\nA second snippet for question {i}."
        out.append(record)
    return out


def write_qa(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, bytes):
        path.write_bytes(records)
    elif isinstance(records, str):
        path.write_text(records, encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_corpus(root: Path, form: str) -> Path:
    if form == "txt":
        path = root / "corpus.txt"
        path.write_text("\n".join(CORPUS[:3]) + "\n\n" + "\n".join(CORPUS[3:]) + "\n" + CORPUS[0] + "\n")
    elif form == "jsonl":
        path = root / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(CORPUS)))
    else:
        path = root / "notes"
        for i, text in enumerate(CORPUS):
            name = f"doc{i}.md" if i % 2 else f"sub/doc{i}.txt"
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(f"# Note {i}\n\n{text}\n" if name.endswith(".md") else text)
        (path / "ignored.pdf").write_text("not a document")
        (path / ".hidden.txt").write_text("hidden")
        (path / "empty.txt").write_text("  \n")
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KEMBED_DOMAINS_DIR", str(tmp_path / "domains"))  # never the user's own folder


def user_dir() -> Path:
    """Where the imports of a test go."""
    return user_domains_dir()


def test_import_jsonl_with_ctx_holds_out_a_test_split(data_dir, tmp_path):
    qa = write_qa(tmp_path / "in" / "qa.jsonl", qa_records(10))
    result = invoke("data", "import", "mydomain", "--qa", qa)
    assert result.exit_code == 0, result.output
    assert "records read" in result.output and "imported user domain 'mydomain'" in result.output
    folder = user_dir() / "mydomain"
    assert sorted(p.name for p in folder.iterdir()) == ["domain.json", "test.jsonl", "train.jsonl"]
    train, test = load_records("mydomain", "train"), load_records("mydomain", "test")
    assert (len(train), len(test)) == (8, 2)
    ids = {r.id.split("-", 1)[1] for r in train} | {r.id.split("-", 1)[1] for r in test}
    assert ids == {str(i) for i in range(10)}  # source ids kept, nothing lost
    assert train[0].knowledge == (FACTS[0][3], "A second snippet for question 0.") and train[0].answer == "Paris"
    spec = get_domain("mydomain")
    assert spec.user and spec.splits == {"train": ("train.jsonl",), "test": ("test.jsonl",)}
    assert "mydomain" in list_domains() and "mydomain" not in DOMAINS
    assert load_knowledge_base("mydomain") is None
    assert domain_documents("mydomain")[0] == FACTS[0][3]  # train snippets when there is no corpus
    # the held-out split is seeded: the same input gives the same split
    invoke("data", "import", "again", "--qa", qa)
    assert [r.id for r in load_records("again", "test")] == [r.id for r in test]
    for args in (("data", "validate", "--domain", "mydomain"), ("ls",)):
        out = invoke(*args)
        assert out.exit_code == 0 and "mydomain" in out.output, out.output


@pytest.mark.parametrize("form, suffix", [("txt", ".json"), ("jsonl", ".jsonl"), ("folder", ".json")])
def test_import_without_ctx_retrieves_knowledge_from_the_corpus(data_dir, tmp_path, form, suffix):
    qa = write_qa(tmp_path / f"qa{suffix}", qa_records(5, ctx=False))
    test = write_qa(tmp_path / f"test{suffix}", qa_records(3, ctx=False, start=5)[:2] + qa_records(1, start=2))
    corpus = write_corpus(tmp_path, form)
    result = invoke("data", "import", "kb-" + form, "--qa", qa, "--test", test, "--corpus", corpus)
    assert result.exit_code == 0, result.output
    assert "corpus" in result.output and "7 records had no ctx" in result.output
    documents = load_knowledge_base("kb-" + form)
    assert sorted(documents) == sorted(CORPUS) if form != "folder" else len(documents) == len(CORPUS)
    assert domain_documents("kb-" + form) == documents
    train, test_records = load_records("kb-" + form, "train"), load_records("kb-" + form, "test")
    assert len(train) == 5 and len(test_records) == 3
    for record in train:  # the answering document is among the top-3 BM25 documents
        fact = next(f for f in FACTS if f[0] == record.question)
        assert any(fact[3] in snippet for snippet in record.knowledge), (record.question, record.knowledge)
        assert 1 <= len(record.knowledge) <= userdomains.CONTEXT_TOP_K
    assert test_records[-1].knowledge[0] == FACTS[2][3]  # a record with ctx keeps it
    meta = json.loads((user_dir() / f"kb-{form}" / "domain.json").read_text())
    assert meta["knowledge_base"] == "corpus.jsonl" and meta["context"]["retrieved"] == 7
    if form == "txt":  # one duplicate line, blank lines skipped
        assert meta["corpus"]["dropped"] == {"duplicate": 1}
    if form == "folder":  # the .pdf and the hidden file are not read; the empty file is counted
        assert meta["corpus"]["read"] == len(CORPUS) + 1 and meta["corpus"]["dropped"] == {"empty": 1}


def test_eval_and_validate_on_an_imported_domain(data_dir, tiny_model_dir, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(10, ctx=False))
    corpus = write_corpus(tmp_path, "jsonl")
    assert invoke("data", "import", "mine", "--qa", qa, "--corpus", corpus).exit_code == 0
    validate = invoke("data", "validate", "--domain", "mine")
    assert validate.exit_code == 0 and "mine / train" in validate.output and "mine / test" in validate.output
    for mode in ("closed-book", "oracle-context", "retrieved-context"):
        out = tmp_path / f"eval-{mode}"
        result = invoke("eval", "--domain", "mine", "--model", tiny_model_dir, "--output", out, "--precision", "fp32",
                        "--limit", "2", "--mode", mode)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "results.json").read_text())
        assert summary["domain"] == "mine" and summary["n"] == 2 and summary["split"] == "test"


def test_a_user_domain_needs_no_data_directory_and_counts_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("KEMBED_DATA_DIR", str(tmp_path / "no-data"))  # the built-in data was never fetched
    records = qa_records(6)
    records[1]["answer"], records[1]["answer_idx"] = "London", ""  # answer_not_in_options: dropped
    records[2]["question"] = "   "  # empty_question: dropped
    records[3]["answer"] = "Venus, the second planet"  # the label is used: reconciled
    qa = write_qa(tmp_path / "qa.json", records)
    test = write_qa(tmp_path / "test.json", qa_records(2, start=6))
    result = invoke("data", "import", "counted", "--qa", qa, "--test", test)
    assert result.exit_code == 0, result.output
    for text in ("answer_not_in_options", "empty_question", "text_not_in_options_letter_used"):
        assert text in result.output
    assert not (tmp_path / "no-data").exists()
    records_, report = load_split("counted", "train")
    assert (report.read, report.kept) == (6, 4)
    assert report.dropped == {"answer_not_in_options": 1, "empty_question": 1}
    assert report.reconciled == {"text_not_in_options_letter_used": 1}
    validate = invoke("data", "validate", "--domain", "counted")
    assert validate.exit_code == 0 and "answer_not_in_options" in validate.output
    assert "counted" in invoke("ls").output


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_import_leaves_a_read_only_data_directory_untouched(data_dir, tiny_model_dir, tmp_path):
    for path in [data_dir, *data_dir.rglob("*")]:  # read-only; root may write anyway, so compare the tree too
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = _tree(data_dir)
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(10, ctx=False))
    result = invoke("data", "import", "mine", "--qa", qa, "--corpus", write_corpus(tmp_path, "jsonl"))
    assert result.exit_code == 0, result.output
    assert (user_dir() / "mine" / "domain.json").is_file() and user_dir() != data_dir
    for args in (("data", "validate", "--domain", "mine"), ("index", "build", "--domain", "mine"),
                 ("eval", "--domain", "mine", "--model", tiny_model_dir, "--output", tmp_path / "ev",
                  "--precision", "fp32", "--limit", "1", "--mode", "retrieved-context")):
        assert invoke(*args).exit_code == 0
    assert _tree(data_dir) == before  # nothing created, changed or removed in the built-in data
    assert "mine" in list_domains() and get_domain("mine").folder == str(user_dir() / "mine")


def test_a_domain_imported_into_the_data_directory_is_still_read(data_dir, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(5))
    assert invoke("data", "import", "kept", "--qa", qa).exit_code == 0
    (data_dir / "user").mkdir()
    (user_dir() / "kept").rename(data_dir / "user" / "kept")  # where earlier versions imported it
    assert len(load_records("kept", "train")) == 4 and "kept" in list_domains()
    assert get_domain("kept").folder == str(data_dir / "user" / "kept")
    # a domain in the user's folder comes first
    assert invoke("data", "import", "kept", "--qa", write_qa(tmp_path / "more.jsonl", qa_records(10))).exit_code == 0
    assert len(load_records("kept", "train")) == 8


def test_existing_domain_needs_replace_and_a_failed_replace_keeps_it(data_dir, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(5))
    assert invoke("data", "import", "dup", "--qa", qa).exit_code == 0
    again = invoke("data", "import", "dup", "--qa", qa)
    assert again.exit_code == 2 and "--replace" in again.output
    bad = write_qa(tmp_path / "bad.jsonl", "{oops\n")
    failed = invoke("data", "import", "dup", "--qa", bad, "--replace")
    assert failed.exit_code == 2 and len(load_records("dup", "train")) == 4
    bigger = write_qa(tmp_path / "more.jsonl", qa_records(10))
    assert invoke("data", "import", "dup", "--qa", bigger, "--replace").exit_code == 0
    assert len(load_records("dup", "train")) == 8
    assert sorted(p.name for p in user_dir().iterdir()) == ["dup"]


def test_fetch_keeps_user_domains(data_dir, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(5))
    assert invoke("data", "import", "kept", "--qa", qa).exit_code == 0
    (data_dir / "user").mkdir()
    assert invoke("data", "import", "old", "--qa", qa).exit_code == 0
    (user_dir() / "old").rename(data_dir / "user" / "old")  # imported into the data directory by an earlier version
    source = tmp_path / "upstream"
    write_qa(source / "CurrentEvents" / "CurrentEvents_train.json", qa_records(2))
    fetch_data(data_dir, source_dir=source)
    assert len(load_records("kept", "train")) == 4 and len(load_records("old", "train")) == 4


# --- bad input ------------------------------------------------------------------------------

def _qa(content, suffix=".json"):
    return lambda tmp: ["--qa", write_qa(tmp / f"qa{suffix}", content)]


OK = qa_records(5)
BAD_INPUT = [
    # (id, argument builder, file named in the message, expected text)
    ("malformed-json", _qa('[{"question": "q",}]'), "qa.json", "invalid JSON at line 1"),
    ("malformed-jsonl", _qa(json.dumps(OK[0]) + "\n{oops\n", ".jsonl"), "qa.jsonl", "invalid JSON on line 2"),
    ("top-level-object", _qa('{"question": "q"}'), "qa.json", "expected a JSON array of records"),
    ("not-an-object", _qa([OK[0], "text"]), "qa.json", "record 1: expected an object, got a string"),
    ("wrong-type", _qa([OK[0], {**OK[1], "question": 3}]), "qa.json", "field 'question': expected a string"),
    ("missing-options", _qa([{"question": "q", "answer": "a", "ctx": "c"}]), "qa.json", "field 'options': missing"),
    ("options-list", _qa([{**OK[0], "options": ["Paris", "Rome"]}]), "qa.json", "field 'options': expected an object"),
    ("null-answer", _qa([{**OK[0], "answer": None}]), "qa.json", "field 'answer': expected a string, got null"),
    ("bad-ctx-type", _qa([{**OK[0], "ctx": ["a"]}]), "qa.json", "field 'ctx': expected a string"),
    ("duplicate-id", _qa([OK[0], OK[0]]), "qa.json", "duplicate id"),
    ("undecodable", _qa(b'[{"question": "caf\xe9"}]'), "qa.json", "not UTF-8 text"),
    ("empty-file", _qa(""), "qa.json", "empty file"),
    ("blank-file", _qa("\n  \n", ".jsonl"), "qa.jsonl", "empty file: no records"),
    ("empty-array", _qa("[]"), "qa.json", "no records"),
    ("deep-nesting", _qa("[" * 100000 + "]" * 100000), "qa.json", "nested too deeply"),
    ("lone-surrogate", _qa('[{"question": "q\\ud800", "options": {"A": "a", "B": "b"}, "answer": "a", "ctx": "c"}]'),
     "qa.json", "field 'question': not valid Unicode"),
    ("all-dropped", _qa([{**r, "answer": "nowhere", "answer_idx": "Z"} for r in OK]), "qa.json", "no usable records"),
    ("one-usable", _qa(OK[:1]), "qa.json", "holding out a test split needs at least 2"),
    ("no-ctx-no-corpus", _qa(OK[:2] + qa_records(1, ctx=False, start=2)), "qa.json",
     "record 2 (id 2), field 'ctx': no knowledge snippets, and no --corpus"),
    ("missing-file", lambda tmp: ["--qa", tmp / "nowhere.json"], "nowhere.json", "no such file"),
    ("directory", lambda tmp: ["--qa", tmp], "inputs", "not a file"),
    ("bad-test-file", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--test", write_qa(tmp / "t.jsonl", "[1,")],
     "t.jsonl", "invalid JSON on line 1"),
    ("test-all-dropped", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK),
                                      "--test", write_qa(tmp / "t.json", [{**OK[0], "options": {"A": "x"}}])],
     "t.json", "no usable records"),
    ("corpus-missing-text", lambda tmp: ["--qa", write_qa(tmp / "qa.json", qa_records(3, ctx=False)), "--corpus",
                                         write_qa(tmp / "c.jsonl", '{"text": "ok"}\n{"body": "x"}\n')],
     "c.jsonl", "record 1, field 'text': missing"),
    ("corpus-text-type", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus",
                                      write_qa(tmp / "c.jsonl", '{"text": 5}\n')], "c.jsonl", "expected a string"),
    ("corpus-all-empty", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus",
                                      write_qa(tmp / "c.jsonl", '{"text": "  "}\n')], "c.jsonl", "no documents"),
    ("corpus-empty-folder", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus",
                                         (tmp / "empty-folder").mkdir() or tmp / "empty-folder"],
     "empty-folder", "no .txt or .md files"),
    ("corpus-undecodable", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus",
                                        write_qa(tmp / "c.txt", b"caf\xe9\n")], "c.txt", "not UTF-8 text"),
    ("corpus-other-suffix", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus",
                                         write_qa(tmp / "c.pdf", "x")], "c.pdf", "a corpus is a .txt file"),
    ("corpus-missing", lambda tmp: ["--qa", write_qa(tmp / "qa.json", OK), "--corpus", tmp / "no-corpus"],
     "no-corpus", "no such file or folder"),
]


@pytest.mark.parametrize("case, build, filename, expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_leaves_nothing(data_dir, tmp_path, case, build, filename, expected):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    result = invoke("data", "import", "bad", *build(inputs))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert filename in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (user_dir() / "bad").exists()
    assert not user_dir().exists() or not any(user_dir().iterdir())  # no partial folder either


def test_enormous_file_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(userdomains, "MAX_FILE_BYTES", 100)
    qa = write_qa(tmp_path / "qa.json", OK)
    result = invoke("data", "import", "big", "--qa", qa)
    assert result.exit_code == 2 and "qa.json: too large" in result.output and "limit is 100 bytes" in result.output
    assert not (user_dir() / "big").exists()
    # a corpus folder counts its files together
    monkeypatch.setattr(userdomains, "MAX_FILE_BYTES", 150)
    small = write_qa(tmp_path / "small.json", [{"question": "q", "options": {"A": "a", "B": "b"}, "answer": "a"}])
    assert small.stat().st_size < 150
    result = invoke("data", "import", "big", "--qa", small, "--corpus", write_corpus(tmp_path, "folder"))
    assert result.exit_code == 2 and "notes: too large" in result.output, result.output
    assert not (user_dir() / "big").exists()


@pytest.mark.parametrize("name, expected", [("medical", "is a built-in domain"), ("Bad Name", "invalid domain name"),
                                            ("../evil", "invalid domain name"), ("-x", "invalid domain name"),
                                            ("a" * 65, "invalid domain name")])
def test_bad_names(data_dir, tmp_path, name, expected):
    qa = write_qa(tmp_path / "qa.json", OK)
    result = invoke("data", "import", "--qa", qa, "--", name)  # "--": a name such as "-x" is not an option
    assert result.exit_code == 2 and expected in result.output and len(result.output.strip().splitlines()) == 1
    assert not user_dir().exists()


def test_broken_domain_file_is_a_data_error(data_dir, tmp_path):
    assert invoke("data", "import", "fine", "--qa", write_qa(tmp_path / "qa.jsonl", OK)).exit_code == 0
    (user_dir() / "fine" / "domain.json").write_text("{}")
    with pytest.raises(DataError, match=r"domain\.json: not a kembed user-domain file"):
        get_domain("fine")
    unknown = invoke("eval", "--domain", "nosuch")
    assert unknown.exit_code == 2 and "unknown domain 'nosuch'" in unknown.output


def test_the_default_recipe_trains_on_a_20_record_domain(data_dir, tiny_model_dir, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(20))
    test = write_qa(tmp_path / "test.jsonl", qa_records(5, start=20))
    assert invoke("data", "import", "small", "--qa", qa, "--test", test).exit_code == 0
    out = tmp_path / "run"
    result = invoke("train", "sft", "--domain", "small", "--output", out, f"model={tiny_model_dir}", "precision=fp32",
                    "sft.epochs=1")
    assert result.exit_code == 0, result.output
    # 20% of the 20 train records are held out (the RLAG domains' 1000+ records keep 100), and it is said
    assert "16 training records, 4 held out for validation (20% of the train split, at most 100)" in \
        " ".join(result.output.split())
    sample = json.loads((out / "data_sample.json").read_text())
    assert (len(sample["train_ids"]), len(sample["validation_ids"])) == (16, 4)
    assert "validation: 4" in (out / "config.yaml").read_text()  # the run records the number chosen
    # an explicit value wins; one that holds out everything is still a one-line error
    assert invoke("train", "sft", "--domain", "small", "--output", tmp_path / "two", f"model={tiny_model_dir}",
                  "precision=fp32", "sft.epochs=1", "validation=2").exit_code == 0
    assert len(json.loads((tmp_path / "two" / "data_sample.json").read_text())["validation_ids"]) == 2
    result = invoke("train", "sft", "--domain", "small", "--output", tmp_path / "all", "validation=100")
    assert result.exit_code == 2 and "validation = 100 holds out all 20 train records" in result.output
