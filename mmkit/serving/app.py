"""The OpenAI-compatible HTTP API as an ASGI app (Starlette, served by uvicorn):
``POST /v1/chat/completions`` (plain or server-sent events), ``GET /v1/models``, ``GET /health``,
and the chat page at ``GET /`` (``web/index.html``).

The event loop only moves bytes: a request's body is read against a size limit and a deadline,
parsed and checked in a worker thread, then queued on the shared
:class:`~mmkit.serving.batcher.Batcher`. A bad request gets a 4xx JSON error and changes nothing
for the others; a client that leaves has its job cancelled; an error after a stream has started
is sent as an SSE ``error`` event, which the openai client raises and the page shows.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mmkit.core.errors import DataError
from mmkit.inference.generation import Reply, Sampling
from mmkit.serving.batcher import Batcher, Job
from mmkit.serving.requests import ChatRequest, Limits, RequestError, parse_chat_request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    limits: Limits
    default_sampling: Sampling
    served_model: str
    web_page: bool = True
    api_keys: tuple[str, ...] = ()  # empty: no key asked for
    cors_origins: tuple[str, ...] = ()  # empty: no cross-origin browser access


def create_app(batcher: Batcher, settings: ServerSettings) -> Starlette:
    """The ASGI app; ``batcher`` may be None for an app that only serves its page and metadata."""
    api = _Api(batcher, settings)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    if settings.web_page:
        page = resources.files("mmkit.serving").joinpath("web/index.html").read_bytes()
        routes += [Route(path, lambda _: HTMLResponse(page), methods=["GET"]) for path in ("/", "/index.html")]
    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: _http_error, RequestError: _request_error})


def _error_response(error: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body, status_code=error.status, headers=headers)


async def _request_error(request: Request, error: Exception) -> Response:
    return _error_response(error)


async def _http_error(request: Request, error: Exception) -> Response:
    # Starlette's own (404 no route, 405 wrong method) in OpenAI's error shape.
    message = f"no route {request.method} {request.url.path}" if error.status_code == 404 else error.detail
    return _error_response(RequestError(error.status_code, message))


class _Api:
    def __init__(self, batcher: Batcher, settings: ServerSettings) -> None:
        self.batcher = batcher
        self.settings = settings
        self.started = int(time.time())

    async def health(self, request: Request) -> Response:
        batcher = self.batcher
        return JSONResponse({"status": "ok", "model": self.settings.served_model, "batches": batcher.batches,
                             "requests_answered": batcher.requests_answered, "largest_batch": batcher.largest_batch,
                             "cancelled": batcher.cancelled})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.served_model, "object": "model", "created": self.started, "owned_by": "mmkit",
        }]})

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        # Only JSON: a browser may send a cross-origin text/plain POST without asking first.
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "the request body must be JSON, sent with Content-Type: application/json")
        body = await self._body(request)
        generator = self.batcher.generator
        chat = await run_in_threadpool(
            parse_chat_request, body, self.settings.limits, self.settings.default_sampling,
            self.settings.served_model, lambda prompt: len(generator.prompt_ids(prompt)),
            generator.image_processor.check_size)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(self._events(chat, completion_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        job = self.batcher.submit(Job(chat.prompt, chat.sampling))
        reply = await _result_unless_disconnected(request, job)
        if reply is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(self._completion(chat, completion_id, reply))

    def _authorize(self, request: Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of a key was right.
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise RequestError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limits = self.settings.limits
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise RequestError(413, f"request body of {declared} bytes is over the limit of {limits.max_request_bytes}")
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_request_bytes:
                    raise RequestError(413, f"the request body is over the limit of {limits.max_request_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s} s") from None
        except ClientDisconnect:
            raise RequestError(400, "the client left before sending the whole body") from None
        return b"".join(chunks)

    def _completion(self, chat: ChatRequest, completion_id: str, reply: Reply) -> dict:
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.served_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": chat.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": chat.prompt_tokens + reply.completion_tokens},
        }

    async def _events(self, chat: ChatRequest, completion_id: str) -> AsyncIterator[str]:
        """The stream's server-sent events. Starlette cancels this when the client disconnects,
        and the ``finally`` cancels the job with it."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job = Job(chat.prompt, chat.sampling, on_piece=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": self.settings.served_model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(payload)}\n\n"

        done = asyncio.wrap_future(self.batcher.submit(job).result)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while not (done.done() and pieces.empty()):
                piece = asyncio.ensure_future(pieces.get())
                await asyncio.wait({piece, done}, return_when=asyncio.FIRST_COMPLETED)
                if piece.done():
                    yield chunk({"content": piece.result()})
                else:
                    piece.cancel()
            try:
                reply = done.result()
            except Exception as exc:  # the status line is sent: the error goes in the stream
                yield f"data: {json.dumps(_generation_error(exc))}\n\n"
                return
            yield chunk({}, reply.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()


async def _result_unless_disconnected(request: Request, job: Job) -> Reply | None:
    """The job's reply; None, with the job cancelled, if the client disconnects first. A failed
    generation raises a RequestError (4xx for input the model could not take, else 500)."""
    result = asyncio.wrap_future(job.result)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        job.cancel()
        return None
    try:
        return result.result()
    except Exception as exc:
        error = _generation_error(exc)
        status = 400 if error["error"]["type"] == "invalid_request_error" else 500
        raise RequestError(status, error["error"]["message"]) from None


async def _disconnected(receive: Callable[[], Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _generation_error(exc: BaseException) -> dict:
    if isinstance(exc, DataError):
        return RequestError(400, f"the request could not be answered: {exc}").body
    logger.error("generation failed", exc_info=exc)
    return {"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                      "param": None, "code": None}}
