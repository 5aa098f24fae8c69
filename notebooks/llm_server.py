"""A small, deterministic OpenAI-compatible chat server for the examples and the tests.

``POST /v1/chat/completions`` answers like the OpenAI API (plain, or streamed as server-sent
events when ``stream`` is true, with a last ``usage`` chunk when
``stream_options.include_usage`` is), without a model: the reply is picked from a fixed
list by a hash of the conversation, so the same request always gets the same answer, and
``usage`` counts words. ``GET /v1/models`` lists the one model. Every request is counted
(:attr:`LLMServer.requests`), which is how the tests prove that a second run of a notebook
sends none. It binds 127.0.0.1 only and loads nothing from the network.

    server = start()                 # a daemon thread on a free port
    OpenAI(base_url=server.url, api_key="unused")
    server.requests                  # how many requests it served
    server.stop()

``python notebooks/llm_server.py [PORT]`` serves until interrupted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "tiny-deterministic"
REPLIES = [
    "The Bergen Line takes about seven hours; the 08:25 departure arrives before dinner.",
    "Thought: I should check the weather. Action: search('Bergen weather in May')",
    "Observation: May in Bergen is mild, around 14 degrees, and it often rains.",
    "Plan: day one take the morning train and walk Bryggen; day two ride the Floibanen.",
    "Answer: pack a rain jacket, book the 08:25 train and a hotel near the station.",
    "Durable execution records each step, so a replay never pays for it twice.",
]


def reply_for(messages: list[dict[str, Any]]) -> str:
    """The deterministic answer to a conversation."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).digest()
    return REPLIES[int.from_bytes(digest[:4], "big") % len(REPLIES)]


def _words(text: str) -> int:
    return len(text.split())


def _usage(messages: list[dict[str, Any]], answer: str) -> dict[str, int]:
    prompt = sum(_words(str(m.get("content") or "")) for m in messages)
    completion = _words(answer)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class LLMServer(ThreadingHTTPServer):
    """The server; :attr:`requests` counts every request, :attr:`paths` by path."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.lock = threading.Lock()
        self.paths: Counter[str] = Counter()
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        with self.lock:
            return sum(self.paths.values())

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (``.../v1``)."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> LLMServer:
        self._thread = threading.Thread(target=self.serve_forever, name="llm-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: LLMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def _count(self) -> None:
        with self.server.lock:
            self.server.paths[self.path] += 1

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # http.server's naming
        self._count()
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        self._count()
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            messages = list(body["messages"])
        except (ValueError, KeyError, TypeError) as e:
            self._json(400, {"error": {"message": f"bad request: {e}", "type": "invalid"}})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        answer = reply_for(messages)
        usage = _usage(messages, answer)
        model = str(body.get("model") or MODEL)
        ident = "chatcmpl-" + hashlib.sha256(answer.encode()).hexdigest()[:12]
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": 0, "model": model}
        words = answer.split(" ")
        for i, word in enumerate(words):
            delta: dict[str, Any] = {"content": word if i == 0 else " " + word}
            if i == 0:
                delta["role"] = "assistant"
            self._event({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({**chunk, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()


def start(port: int = 0) -> LLMServer:
    """A started server on 127.0.0.1 (a free port unless one is given)."""
    return LLMServer(port).start()


if __name__ == "__main__":
    srv = LLMServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"serving an OpenAI-compatible API at {srv.url} (Ctrl-C stops)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        srv.server_close()
