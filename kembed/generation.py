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

    Args:
        model, tokenizer: the model (on ``placement.device``) and its tokenizer.
        placement: device and precision.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call.
        name: recorded with what it produced.
    """

    def __init__(self, model, tokenizer, placement, *, max_new_tokens: int = 64, batch_size: int = 8,
                 name: str = "local"):
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.max_new_tokens, self.batch_size, self.name = max_new_tokens, batch_size, name

    def generate(self, prompts: list[str], progress=None) -> list[str]:
        """One reply per user prompt (special tokens removed, stripped)."""
        return [text for text, _, _ in self.generate_counted(prompts, progress)]

    def generate_counted(self, prompts: list[str], progress=None) -> list[tuple[str, int, int]]:
        """``(reply, prompt tokens, generated tokens up to and including the first eos)`` per
        user prompt; ``progress(n)`` is called after each batch of n prompts."""
        import torch

        from kembed.methods.common import left_pad

        tok = self.tokenizer
        pad, eos = tok.pad_token_id, tok.eos_token_id
        replies = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i:i + self.batch_size]
                ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"] for p in chunk]
                input_ids = left_pad(ids, pad).to(self.placement.device)  # [b, s]
                attention = left_pad([[1] * len(r) for r in ids], 0).to(self.placement.device)
                with torch.no_grad(), self.placement.autocast():
                    out = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                              max_new_tokens=self.max_new_tokens, pad_token_id=pad)
                for prompt_ids, row in zip(ids, out[:, input_ids.shape[1]:].tolist()):
                    n = row.index(eos) + 1 if eos in row else len(row)
                    replies.append((tok.decode(row[:n], skip_special_tokens=True).strip(), len(prompt_ids), n))
                if progress is not None:
                    progress(len(chunk))
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
