"""A real HTTP server that speaks OpenAI's ``POST /v1/chat/completions``, for teacher tests.

It binds 127.0.0.1 on a free port and serves from a thread. Its replies are deterministic and
built from the request itself: it recognises which response type was asked for by the system
prompt (one of :data:`mmkit.datagen.prompts.SYSTEM_PROMPTS`) and reads the scene from the last
user message (the ``category: [x1, y1, x2, y2]`` lines of the image's context), so every fact in
a reply is true of the scene. It keeps every request's messages (``received``). It can refuse a wrong key, fail its first N requests with a
status, fail every request, answer slowly, or reply with text of the test's choosing; it counts
requests, remembers their Authorization headers and the most requests it had in flight at once.

    with FakeChatServer(api_key="secret", fail_first=2, fail_status=429) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="fake", ...)
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from mmkit.datagen.prompts import SYSTEM_PROMPTS
from mmkit.datagen.rules import detailed_description
from mmkit.synth.world import (
    COLOURS,
    SHAPES,
    capitalise,
    describe,
    number_word,
    objects_from_view,
    quadrant,
    reading_order,
)

_OBJECT_LINE = re.compile(r"^(\w+ \w+): \[([^\]]*)\]$", re.MULTILINE)

HOLD_TIMEOUT_S = 60
# reply(response_type, objects) -> the reply text, or None for the server's own reply.
ReplyHook = Callable[[str, Any], "str | None"]


def scene_objects(context: str) -> tuple[Any, ...]:
    """The scene objects a teacher prompt's context lists (sizes recovered from the boxes)."""
    view = {
        "objects": [
            {"category": category, "bbox": [float(c) for c in box.split(",")]}
            for category, box in _OBJECT_LINE.findall(context)
        ]
    }
    return objects_from_view(view)


def reply_for(response_type: str, objects: tuple[Any, ...]) -> str:
    """The server's own reply: facts of the scene in the format the prompt asks for."""
    ordered = reading_order(objects)
    if response_type == "conversation":
        first = ordered[0]
        present = {(o.colour, o.shape) for o in objects}
        absent = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
        return (
            f"Question: How many objects are in the image?\nAnswer: {capitalise(number_word(len(objects)))}.\n\n"
            f"Question: What is in the {quadrant(first.box)} of the image?\nAnswer: A {describe(first)}.\n\n"
            f"Question: Is there a {absent[0]} {absent[1]} in the image?\nAnswer: No."
        )
    if response_type == "detailed":
        return detailed_description(objects)
    if response_type == "reasoning":
        large = [o for o in ordered if o.size == "large"]
        facts = "; ".join(f"the {describe(o)} is {o.size}" for o in ordered)
        return (
            "Question: How many of the objects are large?\n"
            f"Answer: {capitalise(facts)}. So the answer is {number_word(len(large))}."
        )
    raise ValueError(response_type)


class FakeChatServer:
    def __init__(
        self,
        api_key: str | None = "test-key",
        fail_first: int = 0,
        fail_status: int = 429,
        status: int | None = None,
        message: str = "the server says no",
        delay_s: float = 0.0,
        reply: ReplyHook | None = None,
        finish_reason: str = "stop",
        respond: Callable[[list[dict[str, Any]]], str] | None = None,
        hold_until_in_flight: int = 0,
    ) -> None:
        self.api_key = api_key  # None: no key is checked
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.status = status  # every request fails with this status
        self.message = message
        self.delay_s = delay_s
        self.reply = reply
        self.finish_reason = finish_reason
        self.respond = respond  # messages -> reply text, for requests that are not teacher prompts (judges)
        self.requests = 0
        self.authorizations: list[str | None] = []
        self.types: list[str] = []
        self.received: list[list[dict[str, Any]]] = []  # each request's messages, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        # Each request waits until this many are in flight (at most HOLD_TIMEOUT_S): a test of
        # concurrency sees its requests overlap however busy the machine is, without sleeping.
        self.hold_until_in_flight = hold_until_in_flight
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-openai", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FakeChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode()
                # The request stops counting as in flight before its reply goes out: the client may
                # send its next request the moment the reply arrives, before this thread moves on.
                self._leave()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "test_error", "code": status}}, headers)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                with server._lock:
                    server.requests += 1
                    number = server.requests
                    server.authorizations.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server._arrived.notify_all()
                    server._arrived.wait_for(lambda: server.max_in_flight >= server.hold_until_in_flight,
                                             timeout=HOLD_TIMEOUT_S)
                self._in_flight = True
                try:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    self._answer(number, body)
                finally:
                    self._leave()

            def _leave(self) -> None:
                with server._lock:
                    if getattr(self, "_in_flight", False):
                        server.in_flight -= 1
                        self._in_flight = False

            def _answer(self, number: int, body: bytes) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}")
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._error(401, "invalid API key")
                if server.status is not None:
                    return self._error(server.status, server.message)
                if number <= server.fail_first:
                    headers = {"Retry-After": "0"} if server.fail_status == 429 else None
                    return self._error(server.fail_status, f"try again ({number})", headers)
                try:
                    request = json.loads(body)
                    messages = request["messages"]
                    model = request["model"]
                except (ValueError, KeyError, TypeError):
                    return self._error(400, "malformed request body")
                with server._lock:
                    server.received.append(messages)
                if server.respond is not None:
                    text = server.respond(messages)
                else:
                    response_type = next((t for t, p in SYSTEM_PROMPTS.items() if messages[0]["content"] == p), None)
                    if response_type is None:
                        return self._error(400, "unknown system prompt")
                    with server._lock:
                        server.types.append(response_type)
                    objects = scene_objects(messages[-1]["content"])
                    text = server.reply(response_type, objects) if server.reply else None
                    if text is None:
                        text = reply_for(response_type, objects)
                self._send(200, {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": server.finish_reason,
                    }],
                })

        return Handler


if __name__ == "__main__":  # a server to point `python -m mmkit.datagen --teacher openai` at by hand
    import sys

    with FakeChatServer(api_key=None) as running:
        print(running.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            sys.exit(0)
