"""OpenAI chat-completion requests -> mmkit prompts, with every limit checked before the model runs.

A request that is malformed or over a limit raises :class:`RequestError` carrying the HTTP
status and the OpenAI-style error the client gets; nothing in it reaches the model.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from mmkit.core.errors import DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.inference.generation import Prompt, Sampling

ROLES = {"user": "human", "assistant": "gpt"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_prompt_tokens: int
    max_tokens: int
    allow_remote_images: bool
    remote_timeout_s: float = 10.0


@dataclass(frozen=True)
class ChatRequest:
    prompt: Prompt
    sampling: Sampling
    stream: bool
    prompt_tokens: int


def parse_chat_request(
    body: bytes,
    limits: Limits,
    default_sampling: Sampling,
    served_model: str,
    count_prompt_tokens: Callable[[Prompt], int],
) -> ChatRequest:
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes is over the limit of {limits.max_request_bytes}")
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = request.get("model")
    if model is not None and model != served_model:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {served_model!r}", "model",
                           "model_not_found")
    if request.get("n", 1) != 1:
        raise RequestError(400, "n > 1 is not supported", "n")
    system, turns, image = _conversation(request.get("messages"), limits)
    prompt = Prompt(turns, image, system)
    sampling = _sampling(request, limits, default_sampling)
    try:
        prompt_tokens = count_prompt_tokens(prompt)
    except DataError as exc:
        raise RequestError(400, str(exc), "messages") from None
    if prompt_tokens > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt is {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                           "messages", "context_length_exceeded")
    return ChatRequest(prompt, sampling, bool(request.get("stream", False)), prompt_tokens)


def _conversation(messages: Any, limits: Limits) -> tuple[str | None, list[dict], Image.Image | None]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    system, turns, image = None, [], None
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{param} must be an object", param)
        role = message.get("role")
        if role == "system" and index == 0:
            system = _text_only(message.get("content"), param)
            continue
        if role not in ROLES:
            raise RequestError(400, f"{param}.role={role!r}: use system (first only), user or assistant", param)
        text, images = _content(message.get("content"), param, limits)
        if images:
            if image is not None or len(images) > 1:
                raise RequestError(400, "one image per conversation: this model reads a single image", param)
            image = images[0]
            text = f"{IMAGE_TOKEN}\n{text}"
        expected = "human" if len(turns) % 2 == 0 else "gpt"
        if ROLES[role] != expected:
            raise RequestError(400, f"{param}: turns must alternate user, assistant, user, ...", param)
        turns.append({"from": ROLES[role], "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise RequestError(400, "the last message must be the user's", "messages")
    return system, turns, image


def _text_only(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(400, f"{param}.content must be text", param)


def _content(content: Any, param: str, limits: Limits) -> tuple[str, list[Image.Image]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, f"{param}.content must be a string or a list of parts", param)
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise RequestError(400, f"{param}: an image_url part needs image_url.url", param)
            images.append(load_image_url(url, limits, param))
        else:
            raise RequestError(400, f"{param}: parts are {{type: text}} or {{type: image_url}}, got {kind!r}", param)
    return "".join(texts), images


def load_image_url(url: str, limits: Limits, param: str = "image_url") -> Image.Image:
    """A ``data:`` URL (base64), or with ``allow_remote_images`` an http(s) URL, as a checked image."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, f"{param}: data URLs must be base64 (data:image/...;base64,...)", param)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(413, f"{param}: the image is over the limit of {limits.max_image_bytes} bytes", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"{param}: bad base64 in the data URL ({exc})", param) from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise RequestError(400, f"{param}: http(s) image URLs are off on this server (allow_remote_images=false); "
                               "send the image as a base64 data URL", param)
        data = _fetch(url, limits, param)
    else:
        raise RequestError(400, f"{param}: use a data: URL or an http(s) URL", param)
    return _decode(data, limits, param)


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RequestError(400, f"{param}: could not fetch {url}: {exc}", param) from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{param}: the image is over the limit of {limits.max_image_bytes} bytes", param)
    return data


def _decode(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several types for data that is not an image
        raise RequestError(400, f"{param}: not an image ({exc})", param) from None
    width, height = image.size
    # Checked from the header, before any pixel is decoded.
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"{param}: a {width}x{height} image is over the limit of {limits.max_image_pixels} pixels",
                           param)
    try:
        image.load()
    except Exception as exc:
        raise RequestError(400, f"{param}: the image cannot be decoded ({exc})", param) from None
    return image.convert("RGB")


def _sampling(request: dict, limits: Limits, default: Sampling) -> Sampling:
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    max_tokens = default.max_new_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"max_tokens={max_tokens!r}: must be a positive integer", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens")
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop must be a string or a list of strings", "stop")
    temperature = request.get("temperature", default.temperature)
    top_p = request.get("top_p", default.top_p)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RequestError(400, f"{name}={value!r}: must be a number", name)
    try:
        return Sampling(max_tokens, float(temperature), float(top_p), tuple(stop))
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
