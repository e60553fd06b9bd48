"""``kembed data export``: the examples a training run trained on, in a dataset format that
other tools train from.

Every method writes the text of each training stage's examples to its run directory as it
trains, ``examples/<NNN>-<stage>.jsonl`` in training order
(:func:`kembed.methods.common.save_examples`). The export converts each of those files into one
file of the same name. Format ``trl`` writes TRL's dataset formats
(https://huggingface.co/docs/trl/dataset_formats), as JSON lines that
``datasets.load_dataset("json", data_files=...)`` reads:

- conversational prompt-completion, ``{"prompt": [{"role": "user", ...}], "completion":
  [{"role": "assistant", ...}]}``, for SFT's examples (also CPT+SFT's SFT stage), RAFT's
  oracle/distractor prompts with their quoting targets, SimRAG's Stage-I examples and its Stage-II
  training set (the kept pairs plus the Stage-I examples, as the stage trains). TRL's
  ``SFTTrainer`` trains on the completion only by default, as kembed does.
- language modeling, ``{"text": ...}``, for CPT: the documents whose tokens its trained blocks
  hold. kembed cut them into fixed-size blocks; ``SFTTrainer`` does the same with ``packing=True,
  packing_strategy="wrapped"`` and ``max_length`` the block size.
- conversational preference, ``{"prompt", "chosen", "rejected"}``, for RLAG's trained pairs
  (``DPOTrainer``). The prompt is the closed-book chat prompt, the one RLAG scores the rejected
  (naive) answer under. The chosen answer is the one the model gave with the knowledge snippets
  in the prompt. TRL's format has one prompt for both answers, so the snippets (RLAG's augmented
  prompt and its knowledge term) are not in the set. A pair whose two answers agree states no
  preference and is left out: RLAG trains it on the knowledge term only.

The export needs neither TRL nor ``datasets``; it writes JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kembed.errors import DataError, KembedError

FORMATS = ("trl",)

#: example kind -> the fields of a stored row (see ``save_examples``) that the export reads
KINDS = {
    "prompt-completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "language-modeling": ("text",),
}


@dataclass
class ExportedFile:
    """One exported training stage.

    Attributes:
        source: the run's ``examples/`` file.
        path: the file written (None when no example was left to write).
        kind: ``prompt-completion``, ``preference`` or ``language-modeling`` (None: an empty file).
        rows: examples written.
        skipped: examples left out (preference pairs whose chosen and rejected answers agree).
    """

    source: Path
    path: Path | None
    kind: str | None
    rows: int
    skipped: int


def row_kind(row: dict) -> str | None:
    """The kind of a stored example row (the first of :data:`KINDS` whose fields it has), or None."""
    return next((kind for kind, fields in KINDS.items() if isinstance(row, dict) and set(fields) <= row.keys()), None)


def trl_row(row: dict, kind: str) -> dict | None:
    """A stored row of ``kind`` in TRL's format; None for a preference pair without a preference."""
    if kind == "language-modeling":
        return {"text": row["text"]}
    prompt = [{"role": "user", "content": row["prompt"]}]
    if kind == "prompt-completion":
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": row["completion"]}]}
    if row["chosen"] == row["rejected"]:
        return None
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def read_examples(path: Path) -> tuple[str | None, list[dict]]:
    """The kind (None when empty) and rows of one ``examples/`` file.

    Raises:
        DataError: a line that is not JSON, a row of no known kind, a field that is not text,
            or rows of different kinds.
    """
    from kembed.data import read_records

    kind, rows = None, []
    for i, row in enumerate(read_records(path, jsonl=True)):
        this = row_kind(row)
        if this is None:
            raise DataError(path, "not an example row: needs the fields " + " or ".join(
                "/".join(fields) for fields in KINDS.values()), record=i)
        if kind is not None and this != kind:
            raise DataError(path, f"a {this} row in a file of {kind} rows", record=i)
        bad = next((f for f in KINDS[this] if not isinstance(row[f], str)), None)
        if bad is not None:
            raise DataError(path, "must be a string", record=i, field=bad)
        kind = this
        rows.append(row)
    return kind, rows


def export_run(run: Path, fmt: str = "trl", output: Path | None = None) -> list[ExportedFile]:
    """Write the examples the training run ``run`` trained on, one JSONL file per training stage.

    Args:
        run: a ``kembed train`` run directory.
        fmt: the dataset format (:data:`FORMATS`).
        output: the folder to write into (default ``<run>/export-<fmt>``); files of the same
            names are replaced (removed when the stage has nothing to export).

    Returns:
        One :class:`ExportedFile` per stage, in training order.

    Raises:
        KembedError: an unknown format; ``run`` is not a run directory, or holds no examples
            (no stage finished training, or a kembed older than ``data export`` trained it).
        DataError: a malformed ``examples/`` file.
    """
    from kembed.runs import write_jsonl

    if fmt not in FORMATS:
        raise KembedError(f"unknown export format '{fmt}' (available: {', '.join(FORMATS)})")
    run = Path(run)
    if not (run / "kembed-run.json").is_file():
        raise KembedError(f"{run} is not a kembed run directory (no kembed-run.json)")
    sources = sorted((run / "examples").glob("*.jsonl"))
    if not sources:
        raise KembedError(f"{run} holds no training examples (no examples/*.jsonl): no stage has started training, "
                          "or the run was trained by a kembed older than `kembed data export`; train it again")
    output = Path(output) if output is not None else run / f"export-{fmt}"
    exported = []
    for source in sources:
        kind, rows = read_examples(source)
        converted = [r for r in (trl_row(row, kind) for row in rows) if r is not None]
        path = output / source.name
        if converted:
            write_jsonl(path, converted)
        else:  # nothing to train on: no file (an empty one is not a dataset), nor a stale one
            path.unlink(missing_ok=True)
        exported.append(ExportedFile(source, path if converted else None, kind, len(converted),
                                     len(rows) - len(converted)))
    return exported
