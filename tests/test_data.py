"""Tests for kembed.data: policy branches, malformed input, data-dir resolution, fetch."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from kembed import data
from kembed.data import (DOMAINS, SplitReport, fetch_data, get_domain, load_knowledge_base, load_records,
                         load_split, resolve_data_dir, validation_table, validation_tables)
from kembed.errors import DataError, KembedError

OPTS = {"A": "Paris", "B": "Rome", "C": "Berlin"}


def write(root: Path, folder: str, name: str, records) -> Path:
    """Write ``records`` as a JSON array (.json) or JSON lines (.jsonl), or raw text/bytes."""
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, bytes):
        path.write_bytes(records)
    elif isinstance(records, str):
        path.write_text(records, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def ce_train(tmp_path: Path, records) -> tuple[list, SplitReport]:
    write(tmp_path, "CurrentEvents", "CurrentEvents_train.json", records)
    return load_split("current-events", "train", tmp_path)


def rec(**fields) -> dict:
    base = {"question": "Capital of France?", "options": dict(OPTS)}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


# --- policy ---------------------------------------------------------------------------------

POLICY_CASES = [
    # (record fields, expected answer_index or None, drop reason, reconciliation note)
    (dict(answer="Paris", answer_idx="A"), 0, None, None),
    (dict(answer="  Rome\n"), 1, None, None),
    (dict(answer_idx="C"), 2, None, None),
    (dict(answer="Rome", answer_idx="A"), 1, None, "letter_disagrees_text_used"),
    (dict(answer="Rome", answer_idx="Z"), 1, None, "letter_invalid_text_used"),
    (dict(answer="Paris, France", answer_idx="A"), 0, None, "text_not_in_options_letter_used"),
    (dict(answer="Paris, France"), None, "answer_not_in_options", None),
    (dict(answer="Paris, France", answer_idx="Z"), None, "answer_not_in_options", None),
    (dict(answer_idx="Z"), None, "answer_not_in_options", None),
    (dict(), None, "no_answer", None),
    (dict(answer=" ", answer_idx=""), None, "no_answer", None),
    (dict(question="  ", answer="Paris"), None, "empty_question", None),
    (dict(options={"A": "Paris"}, answer="Paris"), None, "bad_options", None),
    (dict(options={"A": "Paris", "B": " "}, answer="Paris"), None, "bad_options", None),
    (dict(options={"A": "Paris", "B": "Paris", "C": "Rome"}, answer="Paris", answer_idx="B"),
     1, None, "ambiguous_text_letter_used"),
    (dict(options={"A": "Paris", "B": "Paris", "C": "Rome"}, answer="Paris", answer_idx="C"),
     None, "ambiguous_answer", None),
    (dict(options={"A": "Paris", "B": "Paris", "C": "Rome"}, answer="Paris"), None, "ambiguous_answer", None),
]


@pytest.mark.parametrize("fields, index, reason, note", POLICY_CASES)
def test_policy_branch(tmp_path, fields, index, reason, note):
    records, report = ce_train(tmp_path, [rec(**fields)])
    assert report.read == 1
    assert report.kept == len(records) == (reason is None)
    assert report.dropped == (Counter({reason: 1}) if reason else Counter())
    assert report.reconciled == (Counter({note: 1}) if note else Counter())
    if index is not None:
        assert records[0].answer_index == index


def test_policy_counts_over_a_file(tmp_path):
    records, report = ce_train(tmp_path, [rec(**fields) for fields, *_ in POLICY_CASES])
    assert report.read == len(POLICY_CASES)
    assert report.kept == len(records) == 7
    assert report.dropped == Counter(answer_not_in_options=3, no_answer=2, empty_question=1, bad_options=2,
                                     ambiguous_answer=2)
    assert report.reconciled == Counter(letter_disagrees_text_used=1, letter_invalid_text_used=1,
                                        text_not_in_options_letter_used=1, ambiguous_text_letter_used=1)
    assert [r.answer_index for r in records] == [0, 1, 2, 1, 1, 0, 1]
    assert report.options_per_question == Counter({3: 7})


def test_whitespace_normalised_but_case_sensitive(tmp_path):
    opts = {"A": "New  York\tCity", "B": "Gy", "C": "GY"}
    records, report = ce_train(tmp_path, [
        rec(options=opts, answer=" New York City "),
        rec(options=opts, answer="GY"),
        rec(options=opts, answer="new york city"),
    ])
    assert [r.answer_index for r in records] == [0, 2]
    assert records[0].options[0] == "New  York\tCity"
    assert report.dropped == Counter(answer_not_in_options=1)


# --- records: ids, knowledge, schemas ---------------------------------------------------------

def test_record_fields_and_knowledge_splitting(tmp_path):
    records, report = ce_train(tmp_path, [
        rec(idx=7, answer="Rome", answer_idx="B", ctx=" first snippet \n\n  \nsecond\r\nthird\n"),
        rec(idx=8, answer="Paris", answer_idx="A"),
    ])
    first = records[0]
    assert (first.id, first.domain, first.split) == ("train-7", "current-events", "train")
    assert first.options == ("Paris", "Rome", "Berlin") and first.labels == ("A", "B", "C")
    assert first.answer == "Rome" and first.answer_label == "B"
    assert first.knowledge == ("first snippet", "second", "third")
    assert records[1].knowledge == ()
    assert report.snippets_per_question == Counter({3: 1, 0: 1})


def test_ids_from_idx_id_or_position(tmp_path):
    records, _ = ce_train(tmp_path, [rec(idx="q-1", answer="Paris"), rec(id=5, answer="Paris"), rec(answer="Paris")])
    assert [r.id for r in records] == ["train-q-1", "train-5", "train-2"]


def test_ids_unique_when_dev_concatenates_files(tmp_path):
    write(tmp_path, "Astronomy", "astronomy_val.json", [rec(id=1, answer="Paris"), rec(id=2, answer="Rome")])
    write(tmp_path, "Astronomy", "astronomy_dev.json", [rec(answer="Paris"), rec(answer="Rome")])
    records, report = load_split("astronomy", "dev", tmp_path)
    ids = [r.id for r in records]
    assert ids == ["dev-astronomy_val-1", "dev-astronomy_val-2", "dev-astronomy_dev-0", "dev-astronomy_dev-1"]
    assert report.files == ["Astronomy/astronomy_val.json", "Astronomy/astronomy_dev.json"]
    assert report.read == report.kept == 4


def test_duplicate_id_in_a_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"CurrentEvents_train\.json: record 1 \(id 3\), field 'idx': duplicate"):
        ce_train(tmp_path, [rec(idx=3, answer="Paris"), rec(idx=3, answer="Rome")])


def test_barexam_dev_schema(tmp_path):
    write(tmp_path, "BarExam", "BarExam_dev.json", [{
        "sample_id": 1, "idx": "mbe_4", "prompt": "Sue owned land.", "question": "Who wins?",
        "options": {"A": "Sue", "B": "Peg", "C": "Opal", "D": "Nobody"}, "answer_idx": "B",
        "gold_passage": "A deed controls.\nSecond line.",
    }])
    (record,), report = load_split("legal", "dev", tmp_path)
    assert record.id == "dev-mbe_4"
    assert record.question == "Sue owned land.\nWho wins?"
    assert record.answer == "Peg"
    assert record.knowledge == ("A deed controls.", "Second line.")
    assert report.reconciled == Counter() and report.dropped == Counter()


def test_jsonl_split(tmp_path):
    write(tmp_path, "USMLE", "USMLE_test.jsonl", [rec(answer="Rome", answer_idx="B"), rec(answer="Paris")])
    records, report = load_split("medical", "test", tmp_path)
    assert [(r.id, r.answer_index) for r in records] == [("test-0", 1), ("test-1", 0)]


def test_unknown_domain_and_missing_split(tmp_path):
    with pytest.raises(KembedError, match="known domains: medical, legal, astronomy, current-events"):
        get_domain("chemistry")
    with pytest.raises(KembedError, match="no split 'dev'; available: train, test"):
        load_split("medical", "dev", tmp_path)


def test_load_records_limit(tmp_path):
    write(tmp_path, "CurrentEvents", "CurrentEvents_train.json",
          [rec(idx=i, answer="Paris") for i in range(5)] + [rec(answer="Lyon")])
    assert [r.id for r in load_records("current-events", "train", tmp_path, limit=2)] == ["train-0", "train-1"]
    assert len(load_records("current-events", "train", tmp_path)) == 5
    with pytest.raises(KembedError, match="limit"):
        load_records("current-events", "train", tmp_path, limit=-1)


def test_knowledge_base(tmp_path):
    write(tmp_path, "CurrentEvents", "CurrentEvents.txt", " event one \n\nevent two\n")
    assert load_knowledge_base("current-events", tmp_path) == ["event one", "event two"]
    assert load_knowledge_base("medical", tmp_path) is None


def test_domains_table():
    assert set(DOMAINS) == {"medical", "legal", "astronomy", "current-events"}
    assert DOMAINS["medical"].splits == {"train": ("USMLE_val.json",), "test": ("USMLE_test.jsonl",)}
    assert DOMAINS["astronomy"].splits["dev"] == ("astronomy_val.json", "astronomy_dev.json")
    assert DOMAINS["current-events"].knowledge_base == "CurrentEvents.txt"


# --- malformed input ------------------------------------------------------------------------

MALFORMED = [
    ("[{\"question\": \"q\",}]", r"invalid JSON at line 1, column \d+"),
    ("{\"question\": \"q\"}", r"expected a JSON array of records, got an object"),
    ([rec(answer="Paris"), ["not", "an", "object"]], r"record 1: expected an object, got an array"),
    ([rec(answer="Paris", idx=4, options=["Paris", "Rome"])], r"record 0 \(id 4\), field 'options': expected an object"),
    ([rec(answer="Paris", options={"A": "Paris", "B": 2})], r"record 0, field 'options': .*non-string values"),
    ([rec(answer="Paris"), rec(question=3)], r"record 1, field 'question': expected a string, got a number"),
    ([rec(answer=None, answer_idx=1)], r"record 0, field 'answer_idx': expected a string, got a number"),
    ([{"question": "q", "options": OPTS, "answer": None}], r"record 0, field 'answer': expected a string, got null"),
    ([rec(answer="Paris", ctx=["a", "b"])], r"record 0, field 'ctx': expected a string, got an array"),
    ([{"options": OPTS, "answer": "Paris"}], r"record 0, field 'question': missing"),
    ([{"question": "q", "answer": "Paris"}], r"record 0, field 'options': missing"),
    ([rec(answer="Paris", idx=1.5)], r"record 0, field 'idx': expected a number or a non-empty string"),
    (b"[{\"question\": \"caf\xe9\"}]", r"not UTF-8 text"),
]


@pytest.mark.parametrize("content, pattern", MALFORMED)
def test_malformed_file_raises_data_error(tmp_path, content, pattern):
    path = write(tmp_path, "CurrentEvents", "CurrentEvents_train.json", content)
    with pytest.raises(DataError, match=pattern) as info:
        load_split("current-events", "train", tmp_path)
    assert str(info.value).startswith(str(path))


def test_malformed_jsonl_gives_line_number(tmp_path):
    write(tmp_path, "USMLE", "USMLE_test.jsonl", json.dumps(rec(answer="Paris")) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"USMLE_test\.jsonl: invalid JSON on line 3, column 2"):
        load_split("medical", "test", tmp_path)


def test_missing_file_is_a_kembed_error(tmp_path):
    write(tmp_path, "Astronomy", "astronomy_val.json", [rec(answer="Paris")])
    with pytest.raises(KembedError, match=r"astronomy_dev\.json: file not found") as info:
        load_split("astronomy", "dev", tmp_path)
    assert not isinstance(info.value, DataError)


# --- data directory -------------------------------------------------------------------------

def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    arg, env, default = tmp_path / "arg", tmp_path / "env", tmp_path / "default"
    for d in (arg, env, default):
        d.mkdir()
    monkeypatch.setattr(data, "default_data_dir", lambda: default)
    monkeypatch.setenv("KEMBED_DATA_DIR", str(env))
    assert resolve_data_dir(arg) == arg
    assert resolve_data_dir() == env
    monkeypatch.delenv("KEMBED_DATA_DIR")
    assert resolve_data_dir() == default


def test_resolve_data_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("KEMBED_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(KembedError, match=r"nowhere \(from \$KEMBED_DATA_DIR\); run `kembed data fetch`") as info:
        resolve_data_dir()
    assert "\n" not in str(info.value)
    with pytest.raises(KembedError, match=r"from --data-dir.*--data-dir DIR"):
        resolve_data_dir(tmp_path / "also-nowhere")


def test_default_data_dir_is_per_user():
    assert data.default_data_dir().parts[-2:] == ("kembed", "rlag")


# --- tables ---------------------------------------------------------------------------------

def test_validation_table_shows_counts(tmp_path):
    from rich.console import Console

    _, report = ce_train(tmp_path, [rec(**fields) for fields, *_ in POLICY_CASES])
    console = Console(record=True, width=200)
    for table in validation_tables([report]):
        console.print(table)
    text = console.export_text()
    for expected in ("records read", "17", "answer_not_in_options", "letter_disagrees_text_used",
                     "3: 7", "0 / 0.0 / 0"):
        assert expected in text
    assert report.to_dict()["dropped"]["no_answer"] == 2
    json.dumps(report.to_dict())
    assert validation_table(SplitReport("x", "train")).row_count > 0


def test_data_module_does_not_import_torch():
    code = "import sys, kembed.data; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fetch ----------------------------------------------------------------------------------

def make_source(root: Path) -> Path:
    write(root, "CurrentEvents", "CurrentEvents_train.json", [rec(answer="Paris")])
    write(root, "USMLE", "USMLE_test.jsonl", [rec(answer="Rome")])
    (root / "LICENSE").write_text("Apache-2.0\n")
    (root / "unrelated.txt").write_text("not copied\n")
    return root


def leftovers(parent: Path, dest: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_fetch_from_directory(tmp_path):
    source = make_source(tmp_path / "src")
    dest = tmp_path / "out" / "rlag"
    assert fetch_data(dest, source_dir=source) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["CurrentEvents", "LICENSE", "USMLE"]
    assert len(load_records("current-events", "train", dest)) == 1
    assert leftovers(dest.parent, dest) == []


def test_fetch_from_repository_clone_uses_its_data_folder(tmp_path):
    make_source(tmp_path / "clone" / "data")
    dest = fetch_data(tmp_path / "rlag", source_dir=tmp_path / "clone")
    assert (dest / "USMLE" / "USMLE_test.jsonl").is_file()


def test_fetch_replaces_existing_dest(tmp_path):
    dest = tmp_path / "rlag"
    (dest / "stale").mkdir(parents=True)
    fetch_data(dest, source_dir=make_source(tmp_path / "src"))
    assert not (dest / "stale").exists() and (dest / "CurrentEvents").is_dir()
    assert leftovers(tmp_path, dest) == []


def test_fetch_from_directory_without_domains_leaves_dest(tmp_path):
    dest = tmp_path / "rlag"
    (dest / "USMLE").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KembedError, match="holds none of the domain folders"):
        fetch_data(dest, source_dir=tmp_path / "empty")
    assert [p.name for p in dest.iterdir()] == ["USMLE"]
    assert leftovers(tmp_path, dest) == []


def test_fetch_unreachable_url_fails_fast_and_leaves_dest(tmp_path):
    dest = tmp_path / "rlag"
    (dest / "USMLE").mkdir(parents=True)
    start = time.monotonic()
    with pytest.raises(KembedError, match=r"could not download http://127\.0\.0\.1:9/x\.zip \(.*\); "
                                          r"copy the data with `kembed data fetch --from DIR` instead"):
        fetch_data(dest, url="http://127.0.0.1:9/x.zip", timeout=5)
    assert time.monotonic() - start < 5
    assert [p.name for p in dest.iterdir()] == ["USMLE"]
    assert leftovers(tmp_path, dest) == []


def test_fetch_honours_timeout(tmp_path):
    with socket.socket() as server:  # accepts connections (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/x.zip"
        start = time.monotonic()
        with pytest.raises(KembedError, match="could not download .*timed out"):
            fetch_data(tmp_path / "rlag", url=url, timeout=0.5)
        assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_fetch_extracts_data_folder_from_zip(tmp_path):
    buffer = io.BytesIO()
    top = f"RLAG-{data.UPSTREAM_COMMIT}"
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(f"{top}/README.md", "repo readme")
        zf.writestr(f"{top}/LICENSE", "Apache-2.0")
        zf.writestr(f"{top}/data/CurrentEvents/CurrentEvents_train.json", json.dumps([rec(answer="Paris")]))
        zf.writestr(f"{top}/data/CurrentEvents/CurrentEvents.txt", "event\n")
    archive = tmp_path / "upstream.zip"
    archive.write_bytes(buffer.getvalue())
    dest = fetch_data(tmp_path / "rlag", url=archive.as_uri())
    assert sorted(p.name for p in dest.iterdir()) == ["CurrentEvents", "LICENSE"]
    assert load_knowledge_base("current-events", dest) == ["event"]
    assert leftovers(tmp_path, dest) == []


@pytest.fixture
def zip_server(monkeypatch):
    """A loopback HTTP server: ``/old.zip`` redirects to ``/new.zip`` (the zip in ``.body``), and any
    other path is a 404."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/old.zip":
                self.send_response(302)
                self.send_header("Location", "/new.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/new.zip":
                self.send_response(200)
                self.send_header("Content-Length", str(len(httpd.body)))
                self.end_headers()
                self.wfile.write(httpd.body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    httpd.body = b""
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_fetch_follows_redirects_over_http(tmp_path, zip_server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("RLAG-x/LICENSE", "Apache-2.0")
        zf.writestr("RLAG-x/data/USMLE/USMLE_test.jsonl", json.dumps(rec(answer="Rome")) + "\n")
    zip_server.body = buffer.getvalue()
    dest = fetch_data(tmp_path / "rlag", url=f"{zip_server.url}/old.zip", timeout=5)
    assert sorted(p.name for p in dest.iterdir()) == ["LICENSE", "USMLE"]
    assert len(load_records("medical", "test", dest)) == 1
    assert leftovers(tmp_path, dest) == []


def test_fetch_http_error_names_status_and_leaves_dest(tmp_path, zip_server):
    dest = tmp_path / "rlag"
    (dest / "USMLE").mkdir(parents=True)
    with pytest.raises(KembedError, match=r"could not download http://127\.0\.0\.1:\d+/missing\.zip "
                                          r"\(HTTP 404 Not Found\); copy the data with"):
        fetch_data(dest, url=f"{zip_server.url}/missing.zip", timeout=5)
    assert [p.name for p in dest.iterdir()] == ["USMLE"]
    assert leftovers(tmp_path, dest) == []


def test_fetch_rejects_non_zip(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>not a zip</html>")
    with pytest.raises(KembedError, match="did not return a zip archive"):
        fetch_data(tmp_path / "rlag", url=page.as_uri())
    assert not (tmp_path / "rlag").exists() and leftovers(tmp_path, tmp_path / "rlag") == []


# --- the real data --------------------------------------------------------------------------

def real_data_dir() -> Path | None:
    for candidate in (os.environ.get("KEMBED_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared/datasets/rlag"):
        if candidate and Path(candidate, "CurrentEvents").is_dir():
            return Path(candidate)
    return None


@pytest.mark.skipif(real_data_dir() is None, reason="RLAG data not available")
def test_real_data_matches_provenance():
    root = real_data_dir()
    reports = {(d, s): load_split(d, s, root)[1] for d, spec in DOMAINS.items() for s in spec.splits}
    assert "dev" not in DOMAINS["medical"].splits
    assert reports["current-events", "train"].reconciled == Counter(text_not_in_options_letter_used=18)
    assert reports["current-events", "test"].reconciled == Counter(text_not_in_options_letter_used=1)
    assert reports["astronomy", "test"].reconciled == Counter(letter_disagrees_text_used=46)
    assert reports["astronomy", "dev"].reconciled == Counter(letter_disagrees_text_used=2)
    assert reports["astronomy", "train"].dropped == Counter(answer_not_in_options=46)
    assert all(r.kept > 0 for r in reports.values())
    assert reports["medical", "train"].read == 1273 and reports["medical", "test"].read == 1272
    assert len(load_knowledge_base("current-events", root)) > 1000


# --- training samples and knowledge coverage --------------------------------------------------

def test_training_sample_is_seeded_nested_and_holds_validation_out():
    from conftest import make_records

    from kembed.data import training_sample

    records = make_records(30)
    a = training_sample(records, limit=10, validation=5, seed=1)
    assert [r.id for r in a.train] == [r.id for r in training_sample(records, limit=10, validation=5, seed=1).train]
    assert {r.id for r in a.train} != {r.id for r in training_sample(records, limit=10, validation=5, seed=2).train}
    assert {r.id for r in a.train} != {r.id for r in records[:10]}  # not the first N
    assert not {r.id for r in a.train} & {r.id for r in a.validation}
    assert all(r.split == "validation" for r in a.validation) and len(a.validation) == 5
    bigger = training_sample(records, limit=20, validation=5, seed=1)
    assert {r.id for r in a.train} <= {r.id for r in bigger.train}  # a smaller limit is a subset
    assert [r.id for r in bigger.validation] == [r.id for r in a.validation]  # validation does not depend on limit
    assert len(training_sample(records, limit=None, validation=5, seed=1).train) == 25
    with pytest.raises(KembedError, match="holds out all"):
        training_sample(records, limit=None, validation=30, seed=1)


def test_validation_unset_is_sized_to_the_domain():
    from conftest import make_records

    from kembed.data import auto_validation, training_sample

    # 20% of the train split, at most 100: the RLAG train splits (954-2088 records) keep 100
    assert [auto_validation(n) for n in (0, 4, 5, 20, 499, 500, 954, 1469, 2088)] == [0, 0, 1, 4, 99, 100, 100, 100, 100]
    small = training_sample(make_records(20), limit=None, validation=None, seed=1)
    assert (len(small.validation), len(small.train)) == (4, 16)
    # an explicit value wins, and unset draws the same records as that number given explicitly
    assert len(training_sample(make_records(20), limit=None, validation=2, seed=1).validation) == 2
    same = training_sample(make_records(20), limit=None, validation=4, seed=1)
    assert [r.id for r in same.validation] == [r.id for r in small.validation]


def test_knowledge_coverage_counts_on_made_up_records():
    from kembed.data import knowledge_coverage
    from kembed.records import QARecord

    def rec(i, answer, snippets):
        return QARecord(f"q{i}", "toy", "test", f"question {i}?", (answer, "other"), ("A", "B"), 0, snippets)

    train = [rec(0, "x", ("Paris is the capital  of France.", "Rome is in Italy.")), rec(1, "y", ("Water boils.",))]
    questions = [
        rec(1, "Paris", ("Paris is the capital of France.",)),  # all covered (whitespace differs), answer in it
        rec(2, "Italy", ("Rome is in Italy.", "Milan is in Italy.")),  # some; answer in a covered one
        rec(3, "Milan", ("Rome is in Italy.", "Milan is rich.")),  # some; answer only in the uncovered one
        rec(4, "Oslo", ("Oslo is in Norway.",)),  # none covered; answer in its own snippet
        rec(5, "Lima", ()),  # no snippets
    ]
    assert knowledge_coverage(train, questions) == {"questions": 5, "all": 1, "some": 2, "none": 1, "no_snippets": 1,
                                                    "answer_in_snippets": 4, "answer_covered": 2}


def test_data_coverage_command(data_dir):
    from typer.testing import CliRunner

    from kembed.cli import app

    result = CliRunner().invoke(app, ["data", "coverage", "--domain", "current-events", "--validation", "2",
                                      "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "test" in result.output and "dev" in result.output and "validation" in result.output
