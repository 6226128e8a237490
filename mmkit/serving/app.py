"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (plain or server-sent events),
``GET /v1/models``, ``GET /health``, and the chat page at ``GET /`` (``web/index.html``).
Each request is handled in its own thread and waits for the shared
:class:`~mmkit.serving.batcher.Batcher`; a bad request gets a 4xx JSON error and changes nothing
for the others."""
from __future__ import annotations

import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from mmkit.inference.generation import Reply, Sampling
from mmkit.serving.batcher import Batcher
from mmkit.serving.requests import ChatRequest, Limits, RequestError, parse_chat_request

logger = logging.getLogger(__name__)


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], batcher: Batcher, limits: Limits, default_sampling: Sampling,
                 served_model: str, web_page: bool = True) -> None:
        super().__init__(address, _Handler)
        self.batcher = batcher
        self.limits = limits
        self.default_sampling = default_sampling
        self.served_model = served_model
        self.started = int(time.time())
        self.web_page = resources.files("mmkit.serving").joinpath("web/index.html").read_bytes() if web_page else None


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html") and self.server.web_page is not None:
            self._send(200, "text/html; charset=utf-8", self.server.web_page)
        elif self.path == "/health":
            batcher = self.server.batcher
            self._json(200, {"status": "ok", "model": self.server.served_model, "batches": batcher.batches,
                             "requests_answered": batcher.requests_answered, "largest_batch": batcher.largest_batch})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{
                "id": self.server.served_model, "object": "model", "created": self.server.started, "owned_by": "mmkit",
            }]})
        else:
            self._json(404, RequestError(404, f"no route GET {self.path}").body)

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._drain()
            self._json(404, RequestError(404, f"no route POST {self.path}").body)
            return
        try:
            request = self._parse()
        except RequestError as exc:
            self._json(exc.status, exc.body)
            return
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if request.stream:
                self._stream(request, completion_id)
            else:
                reply = self.server.batcher.answer(request.prompt, request.sampling)
                self._json(200, self._completion(request, completion_id, reply))
        except Exception as exc:  # a generation failure is this request's 500, never the server's end
            logger.exception("generation failed")
            self._json(500, {"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                       "param": None, "code": None}})

    def _content_length(self) -> int:
        text = self.headers.get("Content-Length") or "0"
        if not text.strip().isdigit():
            self.close_connection = True  # the body's end is unknown, so the connection cannot be reused
            raise RequestError(400, f"Content-Length {text!r} is not a byte count")
        return int(text)

    def _parse(self) -> ChatRequest:
        length = self._content_length()
        limits = self.server.limits
        if length > limits.max_request_bytes:
            self.close_connection = True
            raise RequestError(413, f"request body of {length} bytes is over the limit of {limits.max_request_bytes}")
        body = self.rfile.read(length)
        generator = self.server.batcher.generator
        return parse_chat_request(body, limits, self.server.default_sampling, self.server.served_model,
                                  lambda prompt: len(generator.prompt_ids(prompt)))

    def _completion(self, request: ChatRequest, completion_id: str, reply: Reply) -> dict:
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.server.served_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": request.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": request.prompt_tokens + reply.completion_tokens},
        }

    def _stream(self, request: ChatRequest, completion_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(delta: dict, finish_reason: str | None = None) -> None:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": self.server.served_model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""})
        finished: list[Reply] = []
        for piece in self.server.batcher.stream(request.prompt, request.sampling, on_finish=finished.append):
            chunk({"content": piece})
        chunk({}, finished[0].finish_reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _drain(self) -> None:
        try:
            length = self._content_length()
        except RequestError:
            return
        if length <= self.server.limits.max_request_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _json(self, status: int, body: dict) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
