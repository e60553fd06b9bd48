"""Run directories: everything one training run or evaluation leaves behind.

A training run directory holds::

    kembed-run.json     what made it (kind, method, kembed version, start time)
    config.yaml         the resolved recipe
    environment.json    package versions, device, precision, seed, command line
    metrics.jsonl       one JSON object per logged event
    state.json          progress, for --resume (completed iterations)
    model/              the latest trained model in HF format (full weights or a LoRA adapter)
    <method files>      e.g. pairs/iter-001.jsonl for RLAG

Every file is written atomically (temporary file + rename), so an interrupted run never leaves
a half-written file behind and never damages what an earlier iteration wrote.

Under a multi-process launch the main process alone writes the run directory: ``Run.create``
creates it there while the other ranks wait, and ``log``, ``save_state`` and ``save_model``
do nothing on the other ranks (``save_model`` still takes their part in gathering sharded
weights). Files a method writes itself are guarded with ``kembed.distributed.is_main()``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from kembed import __version__, distributed
from kembed.errors import KembedError


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    """Write an iterable of dicts as JSON lines, atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path, missing_ok: bool = False) -> list:
    """The JSON values of a JSON-lines file, one per non-blank line; ``[]`` for a missing file
    when ``missing_ok``, else FileNotFoundError."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cpu_model() -> str:
    """The CPU's model name (``model name`` in ``/proc/cpuinfo``), else the platform's processor
    string: recorded with every speed figure, since timings compare only within one CPU kind."""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(placement=None, seed: int | None = None) -> dict:
    """Versions of the packages that matter (those installed; an absent one is left out), the
    device, precision, seed and command line."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("kembed", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "gguf"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
           "argv": sys.argv, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "seed": seed}
    if placement is not None:
        env.update(device=placement.device, precision=placement.precision)
        if placement.device == "cuda":
            import torch

            env["gpu"] = torch.cuda.get_device_name()
    return env


def training_seconds(events: list[dict]) -> float | None:
    """Wall seconds a run's training took, from its metrics.jsonl rows (``{"event", "time", ...}``,
    in order): the sum over its sessions (each begins at a ``start`` event) of the time from that
    start to the session's last kept work. Kept is an ``iteration_end`` or ``end`` event, or a
    ``train`` step (``label``, ``step``) that no later session logs again: a resume continues
    after its last iteration or epoch checkpoint and redoes (logs again) the steps after it. An
    interrupted session so counts the work its resume kept, not the work it lost.

    Returns:
        Seconds, or ``None`` when the run never finished (no ``end`` event).
    """
    if not any(e.get("event") == "end" for e in events):
        return None
    sessions: list[list[dict]] = []
    for e in events:
        if e.get("event") == "start":
            sessions.append([])
        if sessions:
            sessions[-1].append(e)
    total, later_steps = 0.0, set()
    for session in reversed(sessions):
        steps = {(e.get("label"), e.get("step")) for e in session if e.get("event") == "train"}
        kept = [e["time"] for e in session if e.get("event") in ("iteration_end", "end")
                or (e.get("event") == "train" and (e.get("label"), e.get("step")) not in later_steps)]
        total += max(kept, default=session[0]["time"]) - session[0]["time"]
        later_steps |= steps
    return round(total, 1)


class Run:
    """One training run directory (see the module docstring for the layout).

    Args:
        path: the directory.
        config: the resolved config (written to ``config.yaml`` by ``create``).
    """

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = config

    @classmethod
    def create(cls, path: Path, config: dict, *, kind: str = "train") -> "Run":
        """Start a new run in ``path``. Under several processes (a collective) the main one
        creates it while the others wait, then open it; ``path`` must be the same on all.

        Raises:
            KembedError: ``path`` exists and is not empty (use ``--resume`` or a new folder);
                raised on the main process, whose failure ends the launch.
        """
        path = Path(path)
        if not distributed.is_main():
            distributed.barrier()  # the main process creates the directory
            return cls.open(path)
        if path.exists() and not path.is_dir():
            raise KembedError(f"{path} is a file, not a run directory")
        if path.exists() and any(path.iterdir()):
            raise KembedError(f"{path} already exists and is not empty: pass --resume to continue that run "
                              "or choose another --output")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, config)
        write_json(path / "kembed-run.json", {"kind": kind, "method": config.get("method"),
                                              "kembed_version": __version__,
                                              "created": datetime.now(timezone.utc).isoformat()})
        write_atomic(path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        distributed.barrier()
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        """Open an existing run for ``--resume`` (the main process repairs an interrupted
        ``save_model``; with several processes, wait at a barrier before reading ``model/``).

        Raises:
            KembedError: ``path`` is not a kembed run directory.
        """
        path = Path(path)
        if not (path / "kembed-run.json").is_file() or not (path / "config.yaml").is_file():
            raise KembedError(f"{path} is not a kembed run directory (no kembed-run.json / config.yaml)")
        if distributed.is_main() and not (path / "model").exists() and (path / ".model-old").is_dir():
            (path / ".model-old").rename(path / "model")  # interrupted between the two renames of save_model
        return cls(path, yaml.safe_load((path / "config.yaml").read_text()))

    def log(self, event: str, **values) -> None:
        """Append one JSON line ``{"event": ..., "time": ..., **values}`` to metrics.jsonl
        (main process only)."""
        if not distributed.is_main():
            return
        row = {"event": event, "time": round(time.time(), 3), **values}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    @property
    def state(self) -> dict:
        """Progress saved by ``save_state`` (``{}`` for a fresh run)."""
        p = self.path / "state.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_state(self, **state) -> None:
        """Record progress in state.json (main process only)."""
        if not distributed.is_main():
            return
        write_json(self.path / "state.json", state)

    def save_model(self, model, tokenizer) -> Path:
        """Save the model (HF format; a LoRA adapter for peft models) and tokenizer to
        ``model/``, replacing the previous one only once the new one is complete.

        Call it on every rank: weights sharded over the ranks (FSDP2, ZeRO-3) are gathered by
        all of them (:func:`kembed.distributed.full_state_dict`); only the main process writes.
        """
        state_dict = distributed.full_state_dict(model)
        if not distributed.is_main():
            return self.path / "model"
        target, old = self.path / "model", self.path / ".model-old"
        for stale in self.path.glob(".model-*"):  # left by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".model-new-"))
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return target
