"""Text generation for the methods that write their own training data (RAFT's teacher,
SimRAG's answer extraction and question generation): a local model through transformers, or
an OpenAI-compatible chat-completions endpoint."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from kembed.errors import KembedError


class LocalGenerator:
    """Greedy generation with a local causal LM, in left-padded batches, chat-templated.

    A batch holds at most ``batch_size`` prompts (in input order) and at most ``batch_tokens``
    tokens counted as prompts x (longest prompt + ``max_new_tokens``); a batch that still runs
    out of memory is halved and retried (:func:`kembed.scoring.run_halving`).

    Args:
        model, tokenizer: the model (on ``placement.device``) and its tokenizer.
        placement: device and precision.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call at most.
        batch_tokens: token budget of one ``generate`` call (a longer single prompt runs alone).
        name: recorded with what it produced.
    """

    def __init__(self, model, tokenizer, placement, *, max_new_tokens: int = 64, batch_size: int = 8,
                 batch_tokens: int = 8192, name: str = "local"):
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.max_new_tokens, self.batch_size, self.batch_tokens, self.name = max_new_tokens, batch_size, batch_tokens, name

    def generate(self, prompts: list[str], progress=None) -> list[str]:
        """One reply per user prompt (special tokens removed, stripped)."""
        return [text for text, _, _ in self.generate_counted(prompts, progress)]

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Consecutive prompt indices grouped under ``batch_size`` and ``batch_tokens``."""
        batches, current, longest = [], [], 0
        for i, n in enumerate(lengths):
            wider = max(longest, n)
            if current and (len(current) == self.batch_size
                            or (len(current) + 1) * (wider + self.max_new_tokens) > self.batch_tokens):
                batches.append(current)
                current, wider = [], n
            current.append(i)
            longest = wider
        return batches + [current] if current else batches

    def generate_counted(self, prompts: list[str], progress=None) -> list[tuple[str, int, int]]:
        """``(reply, prompt tokens, generated tokens up to and including the first eos)`` per
        user prompt; ``progress(n)`` is called as each n prompts finish."""
        import torch

        from kembed.tensors import left_pad
        from kembed.scoring import run_halving

        tok = self.tokenizer
        pad, eos = tok.pad_token_id, tok.eos_token_id
        device = next(self.model.parameters()).device
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for p in prompts]

        def run(batch: list[int]) -> list[tuple[str, int, int]]:
            rows = [ids[i] for i in batch]
            input_ids = left_pad(rows, pad).to(device)  # [b, s]
            attention = left_pad([[1] * len(r) for r in rows], 0).to(device)
            with torch.no_grad(), self.placement.autocast():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                          max_new_tokens=self.max_new_tokens, pad_token_id=pad)
            replies = []
            for prompt_ids, row in zip(rows, out[:, input_ids.shape[1]:].tolist()):
                n = row.index(eos) + 1 if eos in row else len(row)
                replies.append((tok.decode(row[:n], skip_special_tokens=True).strip(), len(prompt_ids), n))
            return replies

        replies = []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.batches([len(r) for r in ids]):
                replies += run_halving(run, batch, progress)
        finally:
            self.model.train(was_training)
        return replies


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible endpoint (``POST {url}/chat/completions``).

    Args:
        url: base URL, e.g. ``http://localhost:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: environment variable holding the API key (optional).
        max_new_tokens: ``max_tokens`` of each request.
        timeout: seconds per request.

    Raises (from ``generate``):
        KembedError: the endpoint cannot be reached or answers with an error.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None, max_new_tokens: int = 256,
                 timeout: float = 60.0):
        self.url, self.model, self.max_new_tokens, self.timeout = url.rstrip("/"), model, max_new_tokens, timeout
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.name = f"openai:{model}"

    def generate(self, prompts: list[str], progress=None) -> list[str]:
        """One reply per user prompt (temperature 0)."""
        replies = []
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for prompt in prompts:
            body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                               "temperature": 0, "max_tokens": self.max_new_tokens}).encode()
            request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as e:
                raise KembedError(f"teacher endpoint {self.url}: {e}") from None
            replies.append((reply or "").strip())
            if progress is not None:
                progress(1)
        return replies
