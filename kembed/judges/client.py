"""The language-model client of the judges: a local model or an OpenAI-compatible endpoint
(:class:`kembed.endpoint.EndpointBackend`), behind a sqlite cache of raw completions.

The cache key is the sha256 of (judge name, endpoint URL or local model id, prompt template
version, rendered prompt, decoding settings, attempt). It stores the raw completion text and its
token counts, never a parsed verdict: parsing happens in the judges, so re-parsing stored
completions costs no calls, and a retry after an unparsable answer (``attempt`` + 1) gets a key of
its own.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from kembed.endpoint import Completion, EndpointBackend


class LocalBackend:
    """Greedy, chat-templated generation with a local causal LM, in left-padded batches.

    Args:
        model, tokenizer: the model (on ``placement.device``) and its tokenizer.
        placement: device and precision (:func:`kembed.models.choose_placement`).
        model_id: the name recorded in the settings and the cache key (the model argument).
        max_new_tokens: generation budget per prompt, in tokens.
        batch_size: prompts per ``generate`` call.
    """

    kind = "local"

    def __init__(self, model, tokenizer, placement, *, model_id: str, max_new_tokens: int = 256,
                 batch_size: int = 8):
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.model_id, self.max_new_tokens, self.batch_size = model_id, max_new_tokens, batch_size

    def describe(self) -> dict:
        """Backend, model and decoding settings."""
        return {"backend": "local", "model": self.model_id,
                "decoding": {"greedy": True, "max_new_tokens": self.max_new_tokens}}

    def generate(self, prompts: list[str], done: Callable[[int, Completion], None]) -> None:
        """Generate a completion per prompt; ``done(index, completion)`` is called for each."""
        from kembed.generation import LocalGenerator

        generator = LocalGenerator(self.model, self.tokenizer, self.placement, max_new_tokens=self.max_new_tokens,
                                   batch_size=self.batch_size)
        for start in range(0, len(prompts), self.batch_size):
            for j, (text, n_prompt, n_out) in enumerate(generator.generate_counted(prompts[start:start + self.batch_size])):
                done(start + j, Completion(text, n_prompt, n_out))


class JudgeClient:
    """A judge's language model (a :class:`LocalBackend` or :class:`EndpointBackend`) with a
    thread-safe sqlite cache of raw completions and a usage count.

    Args:
        backend: the backend that makes the calls.
        cache_path: the sqlite file; default ``models.cache_dir()/judge-cache.sqlite``; None for
            the default, ``False`` for no cache.

    Attributes:
        usage: ``{"requests", "cache_hits", "prompt_tokens", "completion_tokens"}``; the token
            counts are those of requests actually made (cache hits cost nothing).
    """

    def __init__(self, backend, *, cache_path: str | Path | None | bool = None):
        self.backend = backend
        self.usage = {"requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()
        self._db = None
        if cache_path is not False:
            if cache_path is None:
                from kembed.models import cache_dir

                cache_path = cache_dir() / "judge-cache.sqlite"
            self.cache_path = Path(cache_path)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.cache_path, timeout=60, check_same_thread=False)
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                                 "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
        else:
            self.cache_path = None

    @classmethod
    def local(cls, model: str, *, device: str = "auto", precision: str = "auto", max_new_tokens: int = 256,
              batch_size: int = 8, cache_path=None) -> "JudgeClient":
        """A client on a local model argument (loaded with :func:`kembed.models.load_model`).

        Raises:
            ModelError: the model cannot be loaded offline.
        """
        from kembed.models import choose_placement, load_model, load_tokenizer

        placement = choose_placement(device, precision)
        backend = LocalBackend(load_model(model, placement), load_tokenizer(model), placement, model_id=model,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
        return cls(backend, cache_path=cache_path)

    @classmethod
    def endpoint(cls, url: str, model: str, *, cache_path=None, **options) -> "JudgeClient":
        """A client on an OpenAI-compatible endpoint; ``options`` go to :class:`EndpointBackend`
        (its errors say "judge endpoint" unless ``label`` is given).

        Raises:
            KembedError: ``api_key_env`` names an environment variable that is not set.
        """
        options.setdefault("label", "judge endpoint")
        return cls(EndpointBackend(url, model, **options), cache_path=cache_path)

    @property
    def name(self) -> str:
        """``"<backend>:<model>"``."""
        return f"{self.backend.kind}:{self.describe()['model']}"

    def describe(self) -> dict:
        """Backend, model, endpoint URL (endpoint only) and decoding settings."""
        return self.backend.describe()

    def key(self, prompt: str, *, attempt: int = 0, judge: str = "", template_version: str = "") -> str:
        """The cache key of one call (sha256 hex)."""
        d = self.describe()
        text = json.dumps({"judge": judge, "source": d.get("url") or d["model"], "model": d["model"],
                           "template": template_version, "prompt": prompt, "decoding": d["decoding"],
                           "attempt": attempt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def complete(self, prompts: list[str], *, attempt: int = 0, judge: str = "", template_version: str = "",
                 progress=None) -> list[Completion]:
        """One completion per prompt, from the cache when there, else from the backend (each new
        completion is stored at once, so an interrupted run keeps what it paid for).

        Args:
            prompts: rendered user prompts.
            attempt: the retry number of the caller (part of the cache key).
            judge, template_version: the judge's name and prompt template version (cache key).
            progress: called with 1 per completion obtained.

        Raises:
            KembedError: the backend failed (see :class:`EndpointBackend`).
        """
        keys = [self.key(p, attempt=attempt, judge=judge, template_version=template_version) for p in prompts]
        out: list[Completion | None] = [self._get(k) for k in keys]
        with self._lock:
            self.usage["cache_hits"] += sum(c is not None for c in out)
        if progress is not None:
            for c in out:
                if c is not None:
                    progress(1)
        missing = [i for i, c in enumerate(out) if c is None]

        def done(j: int, completion: Completion) -> None:
            i = missing[j]
            self._put(keys[i], completion)
            with self._lock:
                self.usage["requests"] += 1
                self.usage["prompt_tokens"] += completion.prompt_tokens
                self.usage["completion_tokens"] += completion.completion_tokens
            out[i] = completion
            if progress is not None:
                progress(1)

        self.backend.generate([prompts[i] for i in missing], done)
        return out  # type: ignore[return-value]

    def _get(self, key: str) -> Completion | None:
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT text, prompt_tokens, completion_tokens FROM completions WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else Completion(row[0], row[1] or 0, row[2] or 0, cached=True)

    def _put(self, key: str, c: Completion) -> None:
        if self._db is None:
            return
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?)",
                             (key, c.text, c.prompt_tokens, c.completion_tokens, time.time()))

    def close(self) -> None:
        """Close the cache and the HTTP connections."""
        if self._db is not None:
            self._db.close()
            self._db = None
        http = getattr(self.backend, "http", None)
        if http is not None:
            http.close()


def extract_json_object(text: str) -> dict | None:
    """The first ``{...}`` JSON object in ``text`` (e.g. inside a code fence), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def ask(client: JudgeClient, prompts: list[str], parse: Callable[[str], object | None], *, max_attempts: int,
        judge: str, template_version: str, progress=None) -> list[tuple[object | None, list[str]]]:
    """Complete each prompt and parse it; an answer ``parse`` rejects (returns None) is asked
    again with ``attempt`` + 1, up to ``max_attempts`` tries in all.

    Returns:
        Per prompt ``(parsed or None, raw completion texts of every attempt)``.

    ``progress`` is called with the number of prompts that reached a final state, once per round.
    """
    results: list[tuple[object | None, list[str]]] = [(None, []) for _ in prompts]
    pending = list(range(len(prompts)))
    for attempt in range(max(1, max_attempts)):
        if not pending:
            break
        completions = client.complete([prompts[i] for i in pending], attempt=attempt, judge=judge,
                                      template_version=template_version)
        still = []
        for i, c in zip(pending, completions):
            parsed = parse(c.text)
            results[i] = (parsed, results[i][1] + [c.text])
            if parsed is None:
                still.append(i)
        final = len(pending) - len(still) if attempt + 1 < max(1, max_attempts) else len(pending)
        if progress is not None and final:
            progress(final)
        pending = still
    return results


class LanguageModelJudge:
    """What the language-model judges share: a client, a tries budget per prompt, settings that
    record the client and the prompt-template version, and :func:`ask` bound to them.
    Subclasses set ``name``, ``version`` and ``template_version``.

    Args:
        client: the judge's language model.
        max_attempts: tries per prompt (an unparsable answer is asked again).
        retrieved_top_k: a question without knowledge snippets (medical's and astronomy's test
            splits) is shown this many BM25 documents of its domain as its reference knowledge, as
            the grounded judge does (its ``retrieved_top_k``, the same documents); 0 shows "(none)".
    """

    name = version = template_version = ""

    def __init__(self, client: JudgeClient, *, max_attempts: int = 2, retrieved_top_k: int = 3):
        self.client, self.max_attempts = client, max_attempts
        self.settings = {"client": client.describe(), "template_version": self.template_version,
                         "retrieved_top_k": retrieved_top_k}

    def ask(self, prompts: list[str], parse: Callable[[str], object | None], progress=None):
        """:func:`ask` with this judge's client, tries, name and template version."""
        return ask(self.client, prompts, parse, max_attempts=self.max_attempts, judge=self.name,
                   template_version=self.template_version, progress=progress)
