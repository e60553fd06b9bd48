"""The OpenAI-compatible chat-completions client of the whole package (via httpx): RAFT's and
SimRAG's teacher (:class:`kembed.generation.OpenAIGenerator`) and the language-model judges
(:mod:`kembed.judges.client`) both call their endpoints through :class:`EndpointBackend`.

It sits low in the package (it imports only :mod:`kembed.errors`), so that the methods can use
it without importing the judges.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from kembed.errors import KembedError

#: HTTP statuses that are retried (with back-off) instead of failing at once
RETRY_STATUSES = {429, 500, 502, 503, 504}


@dataclass
class Completion:
    """One raw completion.

    Attributes:
        text: the completion text (stripped).
        prompt_tokens: tokens of the prompt (0 when the endpoint reports no usage).
        completion_tokens: tokens of the completion (0 when the endpoint reports no usage).
        cached: it came from the cache (no request was made).
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class EndpointBackend:
    """An OpenAI-compatible chat-completions endpoint (``POST {url}/chat/completions``) via httpx.

    Requests run in a thread pool of ``max_concurrency`` workers with temperature 0. Timeouts,
    connection errors, 429 and 5xx are retried up to ``max_retries`` times with exponential
    back-off (``backoff * 2**k`` seconds); a ``Retry-After`` header (seconds) on 429/503 is
    honoured instead (capped at ``max_retry_after``).

    Args:
        url: base URL, e.g. ``http://localhost:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: NAME of the environment variable that holds the API key (sent as Bearer).
        max_tokens: ``max_tokens`` of each request.
        timeout: seconds per request.
        max_retries: retries after the first try.
        backoff: base delay of the back-off, seconds.
        max_concurrency: requests in flight at once.
        max_retry_after: the longest ``Retry-After`` wait honoured, seconds.
        label: what the endpoint is for, first in every error message (e.g. ``"judge endpoint"``,
            ``"teacher endpoint"``).

    Raises:
        KembedError: ``api_key_env`` is given but that variable is not set.

    Raises (from ``generate`` and ``request``):
        KembedError: a 4xx other than 429 (at once), retries exhausted (with the URL and the last
            status or error), or a 200 answer without ``choices[0].message.content``.
    """

    kind = "endpoint"

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None, max_tokens: int = 512,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0, max_concurrency: int = 4,
                 max_retry_after: float = 120.0, label: str = "endpoint"):
        import httpx

        self.url, self.model, self.label = url.rstrip("/"), model, label
        self.api_key_env, self.max_tokens, self.timeout = api_key_env, max_tokens, timeout
        self.max_retries, self.backoff, self.max_concurrency = max_retries, backoff, max(1, max_concurrency)
        self.max_retry_after = max_retry_after
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.api_key:
            raise KembedError(f"{label} {self.url}: environment variable {api_key_env} is not set")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=self.max_concurrency))

    def describe(self) -> dict:
        """Backend, model, endpoint URL and decoding settings (never the API key)."""
        return {"backend": "endpoint", "model": self.model, "url": self.url,
                "decoding": {"temperature": 0, "max_tokens": self.max_tokens}}

    def generate(self, prompts: list[str], done: Callable[[int, Completion], None]) -> None:
        """Request a completion per prompt, concurrently; ``done(index, completion)`` per answer
        (called from the worker threads, in the order the answers arrive)."""
        if not prompts:
            return
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            futures = [pool.submit(lambda i=i, p=p: done(i, self.request(p))) for i, p in enumerate(prompts)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def request(self, prompt: str) -> Completion:
        """One chat completion with retries (see the class docstring for what raises)."""
        import httpx

        endpoint = f"{self.url}/chat/completions"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": self.max_tokens}
        last = "no answer"
        for k in range(self.max_retries + 1):
            delay = self.backoff * 2 ** k
            try:
                r = self.http.post(endpoint, json=body)
            except httpx.TimeoutException:
                last = f"timeout after {self.timeout:g} s"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {e})"
            else:
                if r.status_code == 200:
                    return self._parse(r, endpoint)
                last = f"HTTP {r.status_code}"
                if r.status_code not in RETRY_STATUSES:
                    raise KembedError(f"{self.label} {endpoint}: HTTP {r.status_code}: {r.text[:300]}")
                if r.status_code in (429, 503):
                    try:
                        delay = min(float(r.headers["retry-after"]), self.max_retry_after)
                    except (KeyError, ValueError):
                        pass
            if k < self.max_retries:
                time.sleep(max(0.0, delay))
        raise KembedError(f"{self.label} {endpoint}: gave up after {self.max_retries + 1} tries, last: {last}")

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    def _parse(self, r, endpoint: str) -> Completion:
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise KembedError(f"{self.label} {endpoint}: answer is not a chat completion: {r.text[:300]}") from None
        usage = data.get("usage") or {}
        return Completion(text.strip(), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))
