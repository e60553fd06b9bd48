"""Users' own domains: ``kembed data import NAME --qa FILE [--test FILE] [--corpus PATH]``.

An imported domain is stored in the user's own folder, :func:`kembed.data.user_domains_dir`
(``$KEMBED_DOMAINS_DIR``, else ``domains/`` in kembed's per-user data directory), as
``<domains dir>/<NAME>/``; the data directory of the built-in datasets is never written:

- ``train.jsonl``, ``test.jsonl``: the question records in the RLAG schema, one JSON object
  per line (``idx``, ``question``, ``prompt`` when given, ``options``, ``answer`` and/or
  ``answer_idx`` as given, ``ctx``); every source record is kept, including the ones the
  label-reconciliation policy drops, so that loading the files applies the policy again and
  reports the same counts (``kembed data validate``). ``idx`` is the source ``idx``, else
  ``id``, else the record's 0-based position in its source file.
- ``corpus.jsonl`` (with ``--corpus``): the knowledge documents, ``{"text": ..., "source": ...}``
  per line; the domain's knowledge base (:func:`kembed.data.load_knowledge_base`).
- ``domain.json``: the domain spec (splits, knowledge base) and how it was made (sources, test
  split, retrieval, corpus counts).

The folder is written as a hidden temporary sibling (``<domains dir>/.NAME.*.partial``), checked by
loading it back through :func:`kembed.data.load_spec_split`, and renamed into place only then,
so a failed import leaves nothing behind (and ``--replace`` keeps the old domain until the
new one is complete).

Splits: ``--qa`` is the train split and ``--test`` the test split. Without ``--test``, a seeded
(:data:`HOLDOUT_SEED`) random :data:`HOLDOUT_FRACTION` of the ``--qa`` records that the policy
keeps (at least one) becomes the test split; records the policy drops stay in ``train.jsonl``,
where they are counted.

Knowledge: a record without knowledge (no ``ctx`` / ``gold_passage``, or only whitespace) gets
the :data:`CONTEXT_TOP_K` best BM25 documents of the corpus for its question text as ``ctx``
(the paper's knowledge-base step; :mod:`kembed.retrieval`); documents sharing no word with the
question are not used, so a record can end up with fewer, or none (counted). Without
``--corpus`` such a record is an error.

Input: ``--qa``/``--test`` are a JSON array (``.json``) or JSON lines (``.jsonl``/``.ndjson``;
other suffixes: JSON lines when the first character is ``{``), validated by the same record
parser and reconciliation policy as the built-in domains. Corpus: a ``.txt`` file (one document
per non-empty line), a ``.jsonl`` file (objects with a string ``text``), or a folder whose
``.txt``/``.md`` files (recursively, hidden ones skipped) are one document each. Each document's
whitespace is collapsed to single spaces (one document = one line, like the built-in knowledge
base); empty and duplicate documents are dropped and counted. Every file, and a corpus folder's
files together, may hold at most :data:`MAX_FILE_BYTES` bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from kembed import data
from kembed.data import DOMAINS, USER_DOMAIN_FILE, USER_DOMAIN_FORMAT, USER_DOMAIN_NAME, DomainSpec, SplitReport
from kembed.errors import DataError, KembedError

if TYPE_CHECKING:
    from rich.table import Table

MAX_FILE_BYTES = 512 * 2**20  # 512 MiB per input file (a corpus folder: all its files together)
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0
CONTEXT_TOP_K = 3
CONTEXT_INDEX = "bm25"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
CORPUS_FILE = "corpus.jsonl"
CORPUS_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
KEPT_FIELDS = ("prompt", "question", "options", "answer", "answer_idx")


# --- corpus ---------------------------------------------------------------------------------

@dataclass
class CorpusReport:
    """What reading a corpus did.

    Attributes:
        source: the corpus path as given.
        form: ``"txt"``, ``"jsonl"`` or ``"folder"``.
        read: documents read (non-empty lines, JSONL records, or files).
        kept: documents kept.
        dropped: reason (``empty``, ``duplicate``) -> number of documents.
    """

    source: str
    form: str
    read: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return {"source": self.source, "form": self.form, "read": self.read, "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items()))}


def read_corpus(path: str | os.PathLike) -> tuple[list[dict], CorpusReport]:
    """The documents of a corpus (see the module docstring for the three forms).

    Returns:
        ``(documents, report)``: documents as ``{"text", "source"}`` dicts in corpus order
        (``source``: ``file:line`` for a .txt, ``file:record`` for a .jsonl, the file's path
        relative to the folder for a folder), whitespace collapsed, empty and duplicate texts
        dropped (counted in the report).

    Raises:
        KembedError: the path does not exist or is not a supported form.
        DataError: a file is too large, not UTF-8, not valid JSON lines, a record has no string
            ``text``, or no document is left.
    """
    path = Path(path).expanduser()
    report = CorpusReport(str(path), "folder" if path.is_dir() else path.suffix.lower().lstrip("."))
    raw: list[tuple[str, str]] = []  # (text, source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(path, "no .txt or .md files in this corpus folder")
        total = sum(p.stat().st_size for p in files)
        if total > MAX_FILE_BYTES:
            raise DataError(path, f"too large: its .txt/.md files hold {total} bytes (the limit is "
                                  f"{_size_text(MAX_FILE_BYTES)})")
        raw = [(data.read_text(p), p.relative_to(path).as_posix()) for p in files]
    elif not path.exists():
        raise KembedError(f"{path}: no such file or folder (--corpus)")
    elif path.suffix.lower() == ".txt":
        text = _read_input(path)
        raw = [(line, f"{path.name}:{n}") for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    elif path.suffix.lower() in JSONL_SUFFIXES:
        records = data.read_records(path, jsonl=True, text=_read_input(path))
        for pos, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(path, f"expected an object, got {data.json_type(record)}", record=pos)
            if not isinstance(record.get("text"), str):
                problem = "missing" if "text" not in record else \
                    f"expected a string, got {data.json_type(record['text'])}"
                raise DataError(path, problem, record=pos, field="text")
            _check_unicode(record["text"], path, pos, "text")
            raw.append((record["text"], f"{path.name}:{pos}"))
    else:
        raise KembedError(f"{path}: a corpus is a .txt file (one document per line), a .jsonl file "
                          f"(one {{\"text\": ...}} object per line) or a folder of .txt/.md files")
    documents, seen = [], set()
    for text, source in raw:
        report.read += 1
        text = _collapse(text)
        if not text:
            report.dropped["empty"] += 1
        elif text in seen:
            report.dropped["duplicate"] += 1
        else:
            seen.add(text)
            documents.append({"text": text, "source": source})
    report.kept = len(documents)
    if not documents:
        raise DataError(path, f"no documents: all {report.read} read were empty")
    return documents, report


def corpus_table(report: CorpusReport) -> Table:
    """A rich table of a :class:`CorpusReport`."""
    from rich.table import Table

    table = Table(title=f"corpus ({report.form}: {report.source})", title_justify="left")
    table.add_column("check")
    table.add_column("value")
    table.add_row("documents read", str(report.read))
    table.add_row("kept", str(report.kept))
    table.add_row("dropped", str(sum(report.dropped.values())))
    for reason, n in sorted(report.dropped.items()):
        table.add_row(f"  {reason}", str(n))
    return table


# --- import ---------------------------------------------------------------------------------

@dataclass
class ImportResult:
    """What :func:`import_domain` made.

    Attributes:
        spec: the new domain's spec (as :func:`kembed.data.get_domain` now returns it).
        path: its folder.
        reports: one :class:`~kembed.data.SplitReport` per split (train, test), from loading
            the stored files.
        corpus: the corpus report, when a corpus was given.
        retrieved: records whose ``ctx`` came from the corpus index.
        retrieved_empty: of those, records for which no document matched.
        test_from: ``"--test"`` or ``"holdout"``.
    """

    spec: DomainSpec
    path: Path
    reports: list[SplitReport]
    corpus: CorpusReport | None = None
    retrieved: int = 0
    retrieved_empty: int = 0
    test_from: str = "--test"


@dataclass
class _Row:
    """One source record on its way into a split file."""

    record: dict  # the normalised record written to the split file
    kept: bool  # the policy keeps it
    needs_ctx: bool  # kept and without knowledge
    path: Path
    where: object  # record position (and id) for messages


def check_name(name: str) -> None:
    """Raise KembedError unless ``name`` can name a new user domain."""
    if name in DOMAINS:
        raise KembedError(f"'{name}' is a built-in domain; choose another name for your domain")
    if not USER_DOMAIN_NAME.fullmatch(name):
        raise KembedError(f"invalid domain name {name!r}: use 1-64 lowercase letters, digits, '-' and '_', "
                          f"starting with a letter or digit")


def import_domain(name: str, qa: str | os.PathLike, test: str | os.PathLike | None = None,
                  corpus: str | os.PathLike | None = None, replace: bool = False) -> ImportResult:
    """Validate and store a user domain (see the module docstring).

    Args:
        name: the new domain's name (``[a-z0-9][a-z0-9_-]{0,63}``, not a built-in one).
        qa: the question file of the train split (JSON array or JSON lines, RLAG schema).
        test: the question file of the test split; without it a seeded 20% of ``qa`` is held out.
        corpus: the knowledge documents (.txt, .jsonl or a folder of .txt/.md files).
        replace: replace an existing user domain of that name.

    Returns:
        An :class:`ImportResult`.

    Raises:
        KembedError: a bad name, an existing domain without ``replace``, a missing file, too few
            usable records, a write failure.
        DataError: any malformed input, naming the file, record and field.
    """
    check_name(name)
    root = data.user_domains_dir()
    if root.exists() and not root.is_dir():
        raise KembedError(f"{root} (the folder of user domains) is not a directory")
    target = data.user_domain_dir(name, root)
    if target.exists() and not replace:
        raise KembedError(f"user domain '{name}' already exists in {target}; pass --replace to overwrite it")
    qa_path, test_path = Path(qa).expanduser(), Path(test).expanduser() if test is not None else None

    train_rows = _read_rows(qa_path, name, "train")
    test_rows = _read_rows(test_path, name, "test") if test_path is not None else None
    documents, corpus_report = read_corpus(corpus) if corpus is not None else (None, None)

    rows = train_rows + (test_rows or [])
    missing = [row for row in rows if row.needs_ctx]
    if missing and documents is None:
        row = missing[0]
        raise DataError(row.path, f"no knowledge snippets, and no --corpus to retrieve them from "
                                  f"({len(missing)} such records): give each record a 'ctx' or pass --corpus",
                        record=row.where, field="ctx")
    empty = 0
    if missing:
        from kembed.retrieval import build_index

        index = build_index(name, CONTEXT_INDEX, documents=[d["text"] for d in documents])
        hits = index.search_many([_question(row.record) for row in missing], CONTEXT_TOP_K)
        for row, found in zip(missing, hits):
            row.record["ctx"] = "\n".join(text for _, _, text in found)
            empty += not found

    for rows_, path in ((train_rows, qa_path), (test_rows, test_path)):
        if rows_ is not None and not any(row.kept for row in rows_):
            reasons = SplitReport(name, "x")
            for i, raw in enumerate(row.record for row in rows_):
                data.parse_record(raw, i, path, name, "x", "", set(), reasons)
            raise DataError(path, f"no usable records: the label-reconciliation policy drops all {len(rows_)} ("
                                  + ", ".join(f"{k}: {n}" for k, n in sorted(reasons.dropped.items())) + ")")
    test_from = "--test"
    if test_rows is None:
        test_from = "holdout"
        kept = [i for i, row in enumerate(train_rows) if row.kept]
        if len(kept) < 2:
            raise DataError(qa_path, f"{len(kept)} usable records: holding out a test split needs at least 2 "
                                     f"(or pass --test FILE)")
        chosen = set(random.Random(HOLDOUT_SEED).sample(kept, max(1, round(HOLDOUT_FRACTION * len(kept)))))
        test_rows = [row for i, row in enumerate(train_rows) if i in chosen]
        train_rows = [row for i, row in enumerate(train_rows) if i not in chosen]

    meta = {
        "format": USER_DOMAIN_FORMAT, "name": name,
        "description": f"user domain from {qa_path.name}" + (f" and {Path(corpus).name}" if corpus else ""),
        "splits": {split: [file] for split, file in SPLIT_FILES.items()},
        "knowledge_base": CORPUS_FILE if documents is not None else None,
        "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": {"qa": str(qa_path.resolve()), "test": str(test_path.resolve()) if test_path else None,
                    "corpus": str(Path(corpus).expanduser().resolve()) if corpus is not None else None},
        "test_split": ({"from": "--test"} if test_from == "--test" else
                       {"from": "holdout", "fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED}),
        "context": {"retrieved": len(missing), "no_match": empty, "index": CONTEXT_INDEX, "top_k": CONTEXT_TOP_K},
        "corpus": corpus_report.to_dict() if corpus_report else None,
    }
    spec = DomainSpec(name, str(target), {s: (f,) for s, f in SPLIT_FILES.items()},
                      knowledge_base=meta["knowledge_base"], description=meta["description"], user=True)
    reports = _write(target, meta, {"train": train_rows, "test": test_rows}, documents, spec)
    return ImportResult(spec, target, reports, corpus_report, len(missing), empty, test_from)


def _write(target: Path, meta: dict, splits: dict[str, list[_Row]], documents: list[dict] | None,
           spec: DomainSpec) -> list[SplitReport]:
    """Write the domain into a temporary sibling of ``target``, load it back, rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    except OSError as e:
        raise KembedError(f"cannot write the user domain into {target.parent}: {e.strerror or e}") from None
    try:
        for split, rows in splits.items():
            _write_jsonl(tmp / SPLIT_FILES[split], [row.record for row in rows])
        if documents is not None:
            _write_jsonl(tmp / CORPUS_FILE, documents)
        (tmp / USER_DOMAIN_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        reports = []
        for split, rows in splits.items():
            records, report = data.load_spec_split(spec, split, tmp)
            if report.read != len(rows) or report.kept != sum(row.kept for row in rows):  # never expected
                raise KembedError(f"internal error: {split} reloaded as {report.kept}/{report.read} records")
            reports.append(report)
        data.swap_into_place(tmp, target)
        return reports
    except OSError as e:
        raise KembedError(f"cannot write the user domain into {target.parent}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_rows(path: Path, domain: str, split: str) -> list[_Row]:
    """Read and validate one question file; every record becomes a row (kept or not)."""
    text = _read_input(path)
    if not text.strip():
        raise DataError(path, "empty file: no records")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or (path.suffix.lower() != ".json" and text.lstrip()[0] == "{")
    raws = data.read_records(path, jsonl=jsonl, text=text)
    if not raws:
        raise DataError(path, "no records")
    scratch, seen, rows = SplitReport(domain, split), set(), []
    for pos, raw in enumerate(raws):
        record = data.parse_record(raw, pos, path, domain, split, f"{split}-", seen, scratch)
        id_field = next((k for k in ("idx", "id") if k in raw), None)
        where = pos if id_field is None else f"{pos} (id {raw[id_field]})"
        for key, value in raw.items():
            _check_unicode(value, path, where, key)
        ctx = raw["ctx"] if "ctx" in raw else raw.get("gold_passage", "")
        row = {"idx": pos if id_field is None else raw[id_field],
               **{k: raw[k] for k in KEPT_FIELDS if k in raw}, "ctx": ctx if isinstance(ctx, str) else ""}
        rows.append(_Row(row, record is not None, record is not None and not record.knowledge, path, where))
    return rows


def _read_input(path: Path) -> str:
    """The text of an input file, after the existence and size checks."""
    if not path.exists():
        raise KembedError(f"{path}: no such file")
    if not path.is_file():
        raise KembedError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(path, f"too large: {size} bytes (the limit is {_size_text(MAX_FILE_BYTES)})")
    if size == 0:
        raise DataError(path, "empty file")
    return data.read_text(path)


def _check_unicode(value, path: Path, where, field: str) -> None:
    """DataError when a string in ``value`` (nested too) is not valid Unicode (a lone surrogate
    from a JSON escape such as ``\\ud800``), which could not be written back as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(path, "not valid Unicode (an unpaired surrogate such as \\ud800)",
                            record=where, field=field) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path, where, field)
            _check_unicode(v, path, where, field)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, path, where, field)


def _question(record: dict) -> str:
    return "\n".join(p.strip() for p in (record.get("prompt", ""), record["question"]) if p.strip())


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _size_text(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 and n % 2**20 == 0 else f"{n} bytes"
