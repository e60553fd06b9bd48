"""The RLAG domain datasets: where they live, how they load, and how gold answers are decided.

The data is the ``data/`` folder of the RLAG repository (four domain folders). It is never part
of this project: :func:`resolve_data_dir` finds a local copy and :func:`fetch_data` makes one.

Label reconciliation policy
---------------------------
A source record may give its gold answer as a text (``answer``), as a label (``answer_idx``,
a key of ``options``), or both, and the two do not always agree. Texts are matched to the
options after whitespace normalisation (strip, collapse runs of whitespace), case-sensitively:
case-insensitive matching would also accept 3 Astronomy train answers that differ from an
option only in case ("Streaming instability" vs "Streaming Instability") and would merge
options such as "Gy" / "GY"; case-sensitive matching reproduces exactly the cases listed in
PROVENANCE.md. A label is valid when it is one of the option keys (after stripping spaces).
Labels and texts that are absent or empty count as missing.

- text matches one option, label agrees or missing: keep.
- text matches one option, label invalid: keep by text, note ``letter_invalid_text_used``.
- text matches one option, label disagrees: keep by TEXT, note ``letter_disagrees_text_used``
  (PROVENANCE: in Astronomy test/val the text is right).
- text matches several (duplicate) options: keep by label if it points to one of them, note
  ``ambiguous_text_letter_used``; otherwise drop ``ambiguous_answer``. Duplicate options the
  text does not match are kept as they are.
- text missing, label valid: keep by label.
- text not among the options, label valid: keep by LABEL, note ``text_not_in_options_letter_used``
  (PROVENANCE: in CurrentEvents the label is right).
- text not among the options and label missing or invalid, or text missing and label invalid:
  drop ``answer_not_in_options``.
- text and label both missing: drop ``no_answer``.
- checked first: an empty question drops ``empty_question``; fewer than 2 options or an empty
  option text drops ``bad_options``.

Every drop and note is counted in the :class:`SplitReport`; nothing is dropped silently.
Observed on the RLAG data (commit ebc874f): CurrentEvents train 18 and test 1
``text_not_in_options_letter_used``; Astronomy test 46 and val 2 ``letter_disagrees_text_used``;
Astronomy train (no labels) drops 46 ``answer_not_in_options``; every other file keeps all of
its records. Per-file tables: docs/data.md.

Structurally malformed input (invalid JSON, wrong types, missing ``question``/``options``)
raises :class:`~kembed.errors.DataError` naming the file, record and field.

Users' own domains (``kembed data import``, :mod:`kembed.userdomains`) live in the user's own
folder, :func:`user_domains_dir` (``$KEMBED_DOMAINS_DIR``, else ``domains/`` in kembed's per-user
data directory), never inside the data directory of the built-in datasets, which may be
read-only or shared; domains imported by earlier versions into ``<data dir>/user/<name>/`` are
still read. They go through the same loader and policy: :func:`get_domain`, :func:`load_split`,
:func:`load_records`, :func:`load_knowledge_base` and :func:`list_domains` find them next to the
built-in :data:`DOMAINS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

import platformdirs

from kembed.errors import DataError, KembedError
from kembed.records import QARecord

if TYPE_CHECKING:
    from rich.table import Table

ENV_VAR = "KEMBED_DATA_DIR"
UPSTREAM_COMMIT = "ebc874f3da31b949c29ded7b298a5d6e60eb8cfc"
UPSTREAM_ZIP_URL = f"https://codeload.github.com/ChaojunNie/RLAG/zip/{UPSTREAM_COMMIT}"
EXTRA_FILES = ("PROVENANCE.md", "LICENSE")
DOMAINS_ENV_VAR = "KEMBED_DOMAINS_DIR"  # where users' own domains live (see user_domains_dir)
USER_FOLDER = "user"  # where earlier versions imported users' domains: <data dir>/user/<name>/ (still read)
USER_DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
USER_DOMAIN_FILE = "domain.json"
USER_DOMAIN_FORMAT = 1


@dataclass(frozen=True)
class DomainSpec:
    """Where one domain's splits live inside the data directory.

    Attributes:
        name: the domain name used on the command line and in records.
        folder: the domain's folder inside the data directory; for a user domain, the absolute
            path of its own folder.
        splits: split name -> file names inside ``folder``, concatenated in order.
        knowledge_base: file name of the knowledge base, if any: a text file (one document per
            line) or a ``.jsonl`` file (one ``{"text": ...}`` object per line).
        description: one line for listings.
        user: True for a user domain made by ``kembed data import`` (see :func:`user_domains_dir`).
    """

    name: str
    folder: str
    splits: dict[str, tuple[str, ...]]
    knowledge_base: str | None = None
    description: str = ""
    user: bool = False


DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in (
        DomainSpec("medical", "USMLE",
                   {"train": ("USMLE_val.json",), "test": ("USMLE_test.jsonl",)},
                   description="USMLE (MedQA) questions; upstream train file is missing, val is used "
                               "for training"),
        DomainSpec("legal", "BarExam",
                   {"train": ("BarExam_train.json",), "dev": ("BarExam_dev.json",),
                    "test": ("BarExam_test.json",)},
                   description="Bar exam (MBE) questions with gold passages"),
        DomainSpec("astronomy", "Astronomy",
                   {"train": ("Astronomy_train.json",),
                    "dev": ("astronomy_val.json", "astronomy_dev.json"),
                    "test": ("Astronomy_test.json",)},
                   description="LLM-generated astronomy questions from Wikipedia; course-exam test"),
        DomainSpec("current-events", "CurrentEvents",
                   {"train": ("CurrentEvents_train.json",), "dev": ("CurrentEvents_dev.json",),
                    "test": ("CurrentEvents_test.json",)},
                   knowledge_base="CurrentEvents.txt",
                   description="2024-25 news events after the models' cutoff"),
    )
}


def get_domain(name: str, data_dir: str | os.PathLike | None = None) -> DomainSpec:
    """The domain called ``name``: a built-in one (:data:`DOMAINS`), else a user domain
    (:func:`user_domain_roots`; ``data_dir`` only matters for domains that earlier versions
    imported into the data directory).

    Raises:
        KembedError: the name is not a known domain (the message lists the known ones).
        DataError: the user domain's ``domain.json`` is malformed.
    """
    if name in DOMAINS:
        return DOMAINS[name]
    spec = find_user_domain(name, data_dir)
    if spec is not None:
        return spec
    known = [*DOMAINS, *user_domain_names(data_dir)]
    raise KembedError(f"unknown domain '{name}'; known domains: {', '.join(known)}")


def list_domains(data_dir: str | os.PathLike | None = None) -> dict[str, DomainSpec]:
    """Every domain by name: the built-in :data:`DOMAINS`, then the user domains
    (:func:`user_domain_roots`).

    Raises:
        DataError: a user domain's ``domain.json`` is malformed.
    """
    users = [find_user_domain(name, data_dir) for name in user_domain_names(data_dir)]
    return {**DOMAINS, **{spec.name: spec for spec in users}}


# --- the user-domain registry (written by kembed.userdomains) -----------------------------

def user_domains_dir() -> Path:
    """The folder that ``kembed data import`` writes users' domains into (one folder each):
    ``$KEMBED_DOMAINS_DIR``, else ``domains/`` in kembed's per-user data directory
    (``platformdirs.user_data_dir("kembed")``, e.g. ``~/.local/share/kembed/domains``). It is
    never inside the data directory of the built-in datasets."""
    if os.environ.get(DOMAINS_ENV_VAR):
        return Path(os.environ[DOMAINS_ENV_VAR]).expanduser()
    return Path(platformdirs.user_data_dir("kembed")) / "domains"


def user_domain_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for user domains, first match first: :func:`user_domains_dir`, then
    ``user/`` in the data directory (where earlier versions imported them) when it exists."""
    legacy = choose_data_dir(data_dir)[0] / USER_FOLDER
    return [user_domains_dir(), *([legacy] if legacy.is_dir() else [])]


def user_domain_dir(name: str, root: Path | None = None) -> Path:
    """Where the user domain ``name`` lives in ``root`` (default :func:`user_domains_dir`)."""
    return Path(root if root is not None else user_domains_dir()) / name


def find_user_domain(name: str, data_dir: str | os.PathLike | None = None) -> DomainSpec | None:
    """The spec of the user domain ``name`` (the first of :func:`user_domain_roots` holding it), or None.

    Raises:
        DataError: its ``domain.json`` is unreadable or malformed.
    """
    if not USER_DOMAIN_NAME.fullmatch(name):
        return None
    for root in user_domain_roots(data_dir):
        path = user_domain_dir(name, root) / USER_DOMAIN_FILE
        if path.is_file():
            return read_user_spec(path, name)
    return None


def user_domain_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The names of the user domains in :func:`user_domain_roots` (folders holding a
    ``domain.json``; not parsed), sorted."""
    names = {p.name for root in user_domain_roots(data_dir) if root.is_dir() for p in root.iterdir()
             if USER_DOMAIN_NAME.fullmatch(p.name) and (p / USER_DOMAIN_FILE).is_file()}
    return sorted(names)


def read_user_spec(path: Path, name: str) -> DomainSpec:
    """The spec in a user domain's ``domain.json`` at ``path``.

    Raises:
        DataError: the file is unreadable or not a user-domain file for ``name``.
    """
    fix = "; import the domain again (kembed data import --replace)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(path, f"unreadable ({e}){fix}") from None
    ok = (isinstance(meta, dict) and meta.get("format") == USER_DOMAIN_FORMAT and meta.get("name") == name
          and isinstance(meta.get("splits"), dict) and meta["splits"]
          and all(isinstance(files, list) and files and all(isinstance(f, str) for f in files)
                  for files in meta["splits"].values())
          and isinstance(meta.get("knowledge_base"), (str, type(None))))
    if not ok:
        raise DataError(path, f"not a kembed user-domain file (format {USER_DOMAIN_FORMAT}) for '{name}'{fix}")
    return DomainSpec(name, str(path.parent), {s: tuple(f) for s, f in meta["splits"].items()},
                      knowledge_base=meta["knowledge_base"], description=str(meta.get("description", "")),
                      user=True)


def domain_folder(spec: DomainSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding a domain's files: a user domain's own folder, else the built-in
    domain's folder in the data directory (:func:`resolve_data_dir`).

    Raises:
        KembedError: a built-in domain, and the data directory does not exist.
    """
    return Path(spec.folder) if spec.user else resolve_data_dir(data_dir) / spec.folder


def default_data_dir() -> Path:
    """The per-user data directory that ``kembed data fetch`` fills by default."""
    return Path(platformdirs.user_data_dir("kembed")) / "rlag"


def choose_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(path, origin)`` of the data directory that :func:`resolve_data_dir` would use, whether or
    not it exists; ``origin`` says where the choice came from (for messages)."""
    if data_dir is not None:
        path, origin = Path(data_dir), "--data-dir"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        path, origin = default_data_dir(), "the default location"
    return path.expanduser(), origin


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$KEMBED_DATA_DIR``, else the default.

    Raises:
        KembedError: the chosen directory does not exist.
    """
    path, origin = choose_data_dir(data_dir)
    if not path.is_dir():
        raise KembedError(f"no data directory at {path} (from {origin}); run `kembed data fetch` "
                          f"or pass --data-dir DIR")
    return path


@dataclass
class SplitReport:
    """What loading one split did.

    Attributes:
        domain, split: what was loaded.
        files: the files read, relative to the data directory (a user domain's: absolute paths).
        read: records read from the files.
        kept: records returned.
        dropped: drop reason -> number of records.
        reconciled: reconciliation note -> number of kept records it applies to.
        options_per_question: number of options -> number of kept records.
        snippets_per_question: number of knowledge snippets -> number of kept records.
    """

    domain: str
    split: str
    files: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    reconciled: Counter[str] = field(default_factory=Counter)
    options_per_question: Counter[int] = field(default_factory=Counter)
    snippets_per_question: Counter[int] = field(default_factory=Counter)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field (counters as sorted plain dicts)."""
        return {
            "domain": self.domain, "split": self.split, "files": list(self.files),
            "read": self.read, "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "reconciled": dict(sorted(self.reconciled.items())),
            "options_per_question": dict(sorted(self.options_per_question.items())),
            "snippets_per_question": dict(sorted(self.snippets_per_question.items())),
        }


def load_split(domain: str, split: str,
               data_dir: str | os.PathLike | None = None) -> tuple[list[QARecord], SplitReport]:
    """Load one split of a domain, applying the reconciliation policy (module docstring).

    Record ids are ``"<split>-<source id>"`` (the source ``idx``, else ``id``, else the record's
    0-based position in its file); for splits made of several files the file stem is included:
    ``"<split>-<stem>-<source id>"``. The question is ``prompt`` + newline + ``question`` when a
    ``prompt`` is present (BarExam dev); options and labels are the ``options`` object's values
    and keys in order (texts stripped); knowledge is ``ctx`` (else ``gold_passage``) split on
    newlines, stripped, empty lines removed.

    Raises:
        KembedError: unknown domain or split, missing data directory or file.
        DataError: a file is not UTF-8, not valid JSON, or a record is malformed (or has a
            duplicate id).
    """
    spec = get_domain(domain, data_dir)
    if split not in spec.splits:
        raise KembedError(f"domain '{domain}' has no split '{split}'; available: {', '.join(spec.splits)}")
    return load_spec_split(spec, split, domain_folder(spec, data_dir))


def load_spec_split(spec: DomainSpec, split: str, folder: Path) -> tuple[list[QARecord], SplitReport]:
    """:func:`load_split` for a domain spec whose files are in ``folder`` (which need not be the
    spec's own folder: the user-domain import loads its files from a temporary folder)."""
    domain, files = spec.name, spec.splits[split]
    report = SplitReport(domain, split, files=[f"{spec.folder}/{name}" for name in files])
    records: list[QARecord] = []
    seen: set[str] = set()
    for name in files:
        path = folder / name
        prefix = f"{split}-{Path(name).stem}-" if len(files) > 1 else f"{split}-"
        for pos, raw in enumerate(read_records(path)):
            report.read += 1
            record = parse_record(raw, pos, path, domain, split, prefix, seen, report)
            if record is not None:
                records.append(record)
                report.options_per_question[len(record.options)] += 1
                report.snippets_per_question[len(record.knowledge)] += 1
    report.kept = len(records)
    return records, report


def load_records(domain: str, split: str, data_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> list[QARecord]:
    """The kept records of a split (the first ``limit`` of them when ``limit`` is given; for the
    training records of a run use :func:`training_sample`, which draws a seeded random sample).

    Raises:
        KembedError: ``limit`` is negative, or as :func:`load_split`.
        DataError: as :func:`load_split`.
    """
    if limit is not None and limit < 0:
        raise KembedError(f"limit must be >= 0, got {limit}")
    records, _ = load_split(domain, split, data_dir)
    return records if limit is None else records[:limit]


# --- training samples and knowledge coverage ------------------------------------------------

VALIDATION_SPLIT = "validation"  # held out from the train split by :func:`training_sample`
VALIDATION_SHARE = 0.2  # the automatic validation split: this share of the train split,
VALIDATION_MAX = 100  # at most this many records
AUTO_VALIDATION = f"{VALIDATION_SHARE:.0%} of the train split, at most {VALIDATION_MAX}"


def auto_validation(n_train: int) -> int:
    """The size of the validation split when a recipe leaves ``validation`` unset: 20% of the
    ``n_train`` train records (rounded down), at most 100 (current-events, 1469: 100; a
    20-record domain: 4)."""
    return min(VALIDATION_MAX, int(VALIDATION_SHARE * n_train))


@dataclass(frozen=True)
class TrainingSample:
    """The records a run trains on and the validation records held out of the same train split.

    Attributes:
        train: the training records, in file order.
        validation: the held-out validation records (split ``"validation"``), in file order;
            no method ever trains on them.
        seed, limit: what drew them (see :func:`training_sample`).
    """

    train: list[QARecord]
    validation: list[QARecord]
    seed: int
    limit: int | None

    def to_dict(self) -> dict:
        """What a run directory saves (``data_sample.json``): the settings and the record ids."""
        return {"seed": self.seed, "limit": self.limit,
                "train_ids": [r.id for r in self.train], "validation_ids": [r.id for r in self.validation]}


def training_sample(records: list[QARecord], *, limit: int | None, validation: int | None, seed: int) -> TrainingSample:
    """Draw a run's records from a train split: a seeded permutation of the records; its first
    ``validation`` records are the validation split, the next ``limit`` (all the rest when
    ``limit`` is None) the training records. The same seed and split give the same sample for
    every method, a smaller ``limit`` gives a subset of a larger one, and the validation split
    does not depend on ``limit``.

    Args:
        records: the train split, in file order.
        limit: number of training records (None: every record not held out).
        validation: number of records held out for validation (0: none; None:
            :func:`auto_validation`).
        seed: seeds the permutation (``random.Random(seed)``).

    Raises:
        KembedError: ``limit`` or ``validation`` is negative, or ``validation`` leaves no
            training record.
    """
    import random

    if limit is not None and limit < 0:
        raise KembedError(f"limit must be >= 0, got {limit}")
    if validation is None:
        validation = auto_validation(len(records))
    if validation < 0:
        raise KembedError(f"validation must be >= 0, got {validation}")
    if records and validation >= len(records):
        raise KembedError(f"validation = {validation} holds out all {len(records)} train records; choose fewer")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held, rest = order[:validation], order[validation:]
    chosen = rest if limit is None else rest[:limit]
    held_out = [dataclasses.replace(records[i], split=VALIDATION_SPLIT) for i in sorted(held)]
    return TrainingSample([records[i] for i in sorted(chosen)], held_out, seed, limit)


def knowledge_coverage(train: list[QARecord], questions: list[QARecord]) -> dict:
    """How much of each question's knowledge the training records carry.

    A snippet is covered when a training record has the same snippet (exact match after
    whitespace normalisation). The gold answer is covered when its text occurs
    (case-insensitive, whitespace-normalised substring) in one of the question's covered
    snippets.

    Returns:
        ``{"questions", "all", "some", "none", "no_snippets", "answer_in_snippets",
        "answer_covered"}``: counts of questions with all / some (not all) / none of their
        snippets covered (questions without snippets are counted in ``no_snippets`` only), with
        the gold answer inside their own snippets, and with it inside their covered snippets.
    """
    counts = dict.fromkeys(("all", "some", "none", "no_snippets", "answer_in_snippets", "answer_covered"), 0)
    for snippets, covered, kind in _question_coverage(train, questions):
        if not snippets:
            counts["no_snippets"] += 1
        else:
            counts["all" if covered == snippets else "some" if covered else "none"] += 1
        counts["answer_in_snippets"] += kind != NO_ANSWER_SNIPPET
        counts["answer_covered"] += kind == TAUGHT
    return {"questions": len(questions), **counts}


TAUGHT, UNTAUGHT, NO_ANSWER_SNIPPET = "taught", "untaught", "no-answer-snippet"


def _question_coverage(train: list[QARecord], questions: list[QARecord]):
    """Per question: (its snippets, how many the training records carry, its knowledge class)."""
    known = {_normalise(z) for r in train for z in r.knowledge}
    for q in questions:
        snippets = [_normalise(z) for z in q.knowledge]
        covered = [z for z in snippets if z in known]
        answer = _normalise(q.answer).lower()
        kind = (TAUGHT if any(answer in z.lower() for z in covered)
                else UNTAUGHT if any(answer in z.lower() for z in snippets) else NO_ANSWER_SNIPPET)
        yield len(snippets), len(covered), kind


def answer_knowledge(train: list[QARecord], questions: list[QARecord]) -> dict[str, str]:
    """Each question's knowledge class against a run's training records, by the rules of
    :func:`knowledge_coverage`: ``taught`` (its gold answer occurs in one of its snippets that
    the training records carry: what knowledge injection can teach), ``untaught`` (the answer
    is in its own snippets, none of them trained on) or ``no-answer-snippet`` (in none of its
    snippets). The ``taught`` count is :func:`knowledge_coverage`'s ``answer_covered``.

    Returns:
        question id -> class.
    """
    return {q.id: kind for q, (_, _, kind) in zip(questions, _question_coverage(train, questions))}


def held_out_splits(domain: str, data_dir: str | os.PathLike | None, sample: TrainingSample) -> dict[str, list[QARecord]]:
    """Every split a run does not train on: the domain's own splits other than ``train``
    (``test`` first) and, when the sample holds any out, ``validation``.

    Raises:
        KembedError, DataError: as :func:`load_split`.
    """
    names = sorted((s for s in get_domain(domain, data_dir).splits if s != "train"), key=lambda s: s != "test")
    splits = {name: load_split(domain, name, data_dir)[0] for name in names}
    if sample.validation:
        splits[VALIDATION_SPLIT] = sample.validation
    return splits


def coverage_table(coverage: dict[str, dict], title: str) -> Table:
    """A rich table of :func:`knowledge_coverage` results, one row per split."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("split", "questions", "all snippets", "some", "none", "no snippets", "answer in own snippets",
                "answer in covered snippets"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, c in coverage.items():
        table.add_row(split, *(str(c[k]) for k in ("questions", "all", "some", "none", "no_snippets",
                                                    "answer_in_snippets", "answer_covered")))
    return table


def load_knowledge_base(domain: str, data_dir: str | os.PathLike | None = None) -> list[str] | None:
    """The domain's knowledge-base documents, or None if it has none: the non-empty stripped lines
    of a text file, or the stripped non-empty ``text`` fields of a ``.jsonl`` file (user domains).

    Raises:
        KembedError: unknown domain, missing data directory or file.
        DataError: the file is not UTF-8, or a ``.jsonl`` line is not an object with a string
            ``text``.
    """
    spec = get_domain(domain, data_dir)
    if spec.knowledge_base is None:
        return None
    path = domain_folder(spec, data_dir) / spec.knowledge_base
    if path.suffix != ".jsonl":
        text = read_text(path)
        return [line.strip() for line in text.split("\n") if line.strip()]
    documents = []
    for pos, raw in enumerate(read_records(path)):
        if not isinstance(raw, dict):
            raise DataError(path, f"expected an object, got {json_type(raw)}", record=pos)
        if not isinstance(raw.get("text"), str):
            raise DataError(path, "missing" if "text" not in raw else f"expected a string, got "
                            f"{json_type(raw['text'])}", record=pos, field="text")
        if raw["text"].strip():
            documents.append(raw["text"].strip())
    return documents


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise KembedError(f"{path}: file not found (is the data directory complete? "
                          f"`kembed data fetch` restores it)") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (undecodable byte at offset {e.start})") from None


def read_records(path: Path, jsonl: bool | None = None, text: str | None = None) -> list:
    """The raw records of a .json array or a .jsonl file (blank lines skipped).

    ``jsonl`` forces the format (default: by the ``.jsonl`` suffix); ``text`` is the file's
    content when the caller has read it already.
    """
    text = read_text(path) if text is None else text
    if jsonl if jsonl is not None else path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(path, f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}") from None
                except RecursionError:
                    raise DataError(path, f"invalid JSON on line {lineno}: nested too deeply") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(path, "invalid JSON: nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON array of records, got {json_type(data)}")
    return data


def json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_record(raw, pos: int, path: Path, domain: str, split: str, prefix: str,
                  seen: set[str], report: SplitReport) -> QARecord | None:
    """One source record as a QARecord, or None (counted in ``report``) when the policy drops it."""
    if not isinstance(raw, dict):
        raise DataError(path, f"expected an object, got {json_type(raw)}", record=pos)
    where = pos
    id_field = next((k for k in ("idx", "id") if k in raw), None)
    source_id = pos if id_field is None else raw[id_field]
    if isinstance(source_id, bool) or not isinstance(source_id, (int, str)) or source_id == "":
        raise DataError(path, f"expected a number or a non-empty string, got {json_type(source_id)}",
                        record=where, field=id_field)
    record_id = f"{prefix}{source_id}"
    if id_field is not None:
        where = f"{pos} (id {source_id})"
    if record_id in seen:
        raise DataError(path, f"duplicate id {source_id!r} in split '{split}'", record=where, field=id_field)
    seen.add(record_id)

    def text(name: str, required: bool = False) -> str:
        if name not in raw:
            if required:
                raise DataError(path, "missing", record=where, field=name)
            return ""
        if not isinstance(raw[name], str):
            raise DataError(path, f"expected a string, got {json_type(raw[name])}", record=where, field=name)
        return raw[name].strip()

    question = "\n".join(part for part in (text("prompt"), text("question", required=True)) if part)
    if "options" not in raw:
        raise DataError(path, "missing", record=where, field="options")
    options = raw["options"]
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise DataError(path, f"expected an object of label -> option text, got {json_type(options)}"
                        f"{' with non-string values' if isinstance(options, dict) else ''}",
                        record=where, field="options")
    answer, letter = text("answer"), text("answer_idx")
    knowledge_text = text("ctx") if "ctx" in raw else text("gold_passage")

    if not question:
        index, reason, note = None, "empty_question", None
    elif len(options) < 2 or any(not v.strip() for v in options.values()):
        index, reason, note = None, "bad_options", None
    else:
        index, reason, note = _resolve_answer(list(options), [_normalise(v) for v in options.values()],
                                              _normalise(answer), letter)
    if reason is not None:
        report.dropped[reason] += 1
        return None
    if note is not None:
        report.reconciled[note] += 1
    knowledge = tuple(line.strip() for line in knowledge_text.split("\n") if line.strip())
    return QARecord(record_id, domain, split, question, tuple(v.strip() for v in options.values()),
                    tuple(options), index, knowledge)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _resolve_answer(labels: list[str], options: list[str], answer: str,
                    letter: str) -> tuple[int | None, str | None, str | None]:
    """``(answer_index, drop_reason, note)`` for normalised options/answer text and a label."""
    matches = [i for i, option in enumerate(options) if answer and option == answer]
    by_letter = labels.index(letter) if letter in labels else None
    if len(matches) == 1:
        if by_letter is None:
            return matches[0], None, "letter_invalid_text_used" if letter else None
        return matches[0], None, None if by_letter == matches[0] else "letter_disagrees_text_used"
    if matches:
        if by_letter in matches:
            return by_letter, None, "ambiguous_text_letter_used"
        return None, "ambiguous_answer", None
    if by_letter is not None:
        return by_letter, None, "text_not_in_options_letter_used" if answer else None
    return None, "answer_not_in_options" if answer or letter else "no_answer", None


def validation_table(report: SplitReport) -> Table:
    """A rich ``Table`` summarising one :class:`SplitReport` (counts, drops, notes, distributions)."""
    from rich.table import Table

    def distribution(counter: Counter[int]) -> str:
        return ", ".join(f"{k}: {n}" for k, n in sorted(counter.items())) or "-"

    table = Table(title=f"{report.domain} / {report.split}  ({', '.join(report.files)})", title_justify="left")
    table.add_column("check")
    table.add_column("value", overflow="fold")
    table.add_row("records read", str(report.read))
    table.add_row("kept", str(report.kept))
    table.add_row("dropped", str(sum(report.dropped.values())))
    for reason, n in sorted(report.dropped.items()):
        table.add_row(f"  {reason}", str(n))
    table.add_row("reconciled", str(sum(report.reconciled.values())))
    for note, n in sorted(report.reconciled.items()):
        table.add_row(f"  {note}", str(n))
    table.add_row("options per question", distribution(report.options_per_question))
    snippets = report.snippets_per_question
    if snippets:
        mean = sum(k * n for k, n in snippets.items()) / sum(snippets.values())
        table.add_row("snippets per question (min / mean / max)", f"{min(snippets)} / {mean:.1f} / {max(snippets)}")
    table.add_row("snippets per question", distribution(snippets))
    return table


def validation_tables(reports: list[SplitReport]) -> list[Table]:
    """One :func:`validation_table` per report, in order."""
    return [validation_table(report) for report in reports]


def fetch_data(dest: Path | None = None, source_dir: Path | None = None, *,
               url: str = UPSTREAM_ZIP_URL, timeout: float = 30.0) -> Path:
    """Make a local copy of the RLAG ``data/`` folder at ``dest`` (default: :func:`default_data_dir`).

    With ``source_dir``, copies the domain folders (and PROVENANCE.md / LICENSE) from a local
    directory laid out like the upstream ``data/`` folder (or a clone whose ``data/`` it uses).
    Without it, downloads the upstream zip archive at the pinned commit from ``url`` (``timeout``
    seconds for each network operation) and extracts its ``data/`` folder and LICENSE. The copy
    is built in a temporary sibling of ``dest`` and renamed into place only once complete, so a
    failure leaves any existing ``dest`` untouched. User domains that earlier versions imported
    into ``dest`` (its ``user/`` folder) are carried over into the new copy.

    Returns:
        ``dest``.

    Raises:
        KembedError: ``source_dir`` holds no domain folder; the download fails (network error,
            timeout, HTTP error) or is not a zip archive with a ``data/`` folder; ``dest`` is a
            file.
    """
    dest = Path(dest).expanduser() if dest is not None else default_data_dir()
    if dest.exists() and not dest.is_dir():
        raise KembedError(f"{dest} exists and is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        if source_dir is not None:
            _copy_data(Path(source_dir).expanduser(), tmp)
        else:
            _download_data(url, tmp, timeout)
        swap_into_place(tmp, dest, keep=(USER_FOLDER,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _known_folders(root: Path) -> list[str]:
    return [spec.folder for spec in DOMAINS.values() if (root / spec.folder).is_dir()]


def _copy_data(source: Path, tmp: Path) -> None:
    if not _known_folders(source) and _known_folders(source / "data"):
        source = source / "data"
    folders = _known_folders(source)
    if not folders:
        known = ", ".join(spec.folder for spec in DOMAINS.values())
        raise KembedError(f"{source} holds none of the domain folders {known}; "
                          f"pass the upstream RLAG data/ folder")
    for folder in folders:
        for path in sorted((source / folder).rglob("*")):
            target = tmp / path.relative_to(source)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # not copy2: the source may be read-only
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)


def _download_data(url: str, tmp: Path, timeout: float) -> None:
    """Download the zip at ``url`` (http(s) through httpx, following redirects; or a ``file:``
    URL) and extract its ``data/`` folder and LICENSE into ``tmp``."""
    import httpx

    archive = tmp / "upstream.zip"
    reason = None  # why the download failed
    try:
        if urlsplit(url).scheme == "file":  # a local archive (httpx speaks http(s) only)
            shutil.copyfile(url2pathname(urlsplit(url).path), archive)
        else:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
                if response.is_success:
                    with archive.open("wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                else:
                    reason = f"HTTP {response.status_code} {response.reason_phrase}"
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
        reason = str(e) or type(e).__name__
    if reason is not None:
        raise KembedError(f"could not download {url} ({reason}); "
                          f"copy the data with `kembed data fetch --from DIR` instead")
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.is_dir() or ".." in parts or len(parts) < 2:
                    continue
                if parts[1:] == ("LICENSE",):
                    rel = parts[1:]
                elif parts[1] == "data" and len(parts) > 2:
                    rel = parts[2:]
                else:
                    continue
                target = tmp.joinpath(*rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile:
        raise KembedError(f"{url} did not return a zip archive") from None
    archive.unlink()
    if not _known_folders(tmp):
        raise KembedError(f"the archive from {url} has no data/ folder with the domain folders")


def swap_into_place(new: Path, dest: Path, keep: tuple[str, ...] = ()) -> None:
    """Rename ``new`` to ``dest``, replacing an existing ``dest`` only once the rename can happen.

    Entries of the old ``dest`` named in ``keep`` (and absent from ``new``) are moved into the new
    one before the old one is deleted (``fetch_data`` keeps the imported user domains).
    """
    if not dest.exists():
        new.rename(dest)
        return
    old = new.with_name(new.name + ".old")
    dest.rename(old)
    try:
        new.rename(dest)
    except OSError:
        old.rename(dest)
        raise
    for name in keep:
        if (old / name).exists() and not (dest / name).exists():
            (old / name).rename(dest / name)
    shutil.rmtree(old, ignore_errors=True)
