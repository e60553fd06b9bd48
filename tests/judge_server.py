"""A tiny scripted OpenAI-compatible server for the judge tests (not a test file).

``JudgeServer`` listens on 127.0.0.1 (port 0) in a background thread and answers
``POST /v1/chat/completions``. Each request takes the next scripted :class:`Reply` from
``script``; when the script is empty, ``default(prompt)`` (a function of the user prompt returning
a Reply or a content string) answers. Every request is recorded in ``requests`` (the JSON body,
the headers, and the arrival time).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted answer: the HTTP status, a content string (wrapped as a chat completion) or a
    raw ``body``, extra headers, and a delay in seconds before answering."""

    content: str | None = None
    status: int = 200
    body: str | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5})


class JudgeServer:
    """The server; use as a context manager. ``url`` is the base URL (``http://127.0.0.1:<port>/v1``)."""

    def __init__(self, script: list | None = None, default=None):
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers),
                                            "time": time.monotonic()})
                    reply = server.script.pop(0) if server.script else None
                if self.path != "/v1/chat/completions":
                    reply = Reply(status=404, body="not found")
                if reply is None:
                    prompt = body["messages"][-1]["content"]
                    reply = server.default(prompt) if server.default else Reply("{}")
                    if isinstance(reply, str):
                        reply = Reply(reply)
                if isinstance(reply, str):
                    reply = Reply(reply)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.body is not None:
                    data = reply.body.encode()
                else:
                    data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                                            "content": reply.content},
                                                    "finish_reason": "stop"}],
                                       "usage": reply.usage}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
