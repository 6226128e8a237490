"""OpenAI chat-completion requests -> mmkit prompts, with every limit checked before the costly work.

The cheap checks come first: the body's size, then its JSON and field types (pydantic, with
OpenAI's field semantics), then counts and lengths of text and stop strings, then each image's
bytes, header (sides, area, the area preprocessing would allocate) and only then its pixels,
and last the prompt's tokens. A request that is malformed or over a limit raises
:class:`RequestError` carrying the HTTP status and the OpenAI-style error the client gets;
nothing in it reaches the model.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmkit.core.errors import DataError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.data.images import ImageLimits, decode_image, header_size
from mmkit.inference.generation import Prompt, Sampling

ROLES = {"user": "human", "assistant": "gpt"}
# Below this a temperature divides logits into infinities; 0 asks for greedy decoding.
MIN_TEMPERATURE = 1e-5


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """``limits`` of conf/serve.yaml."""

    max_request_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_prompt_tokens: int
    max_tokens: int
    allow_remote_images: bool
    remote_timeout_s: float = 10.0
    max_image_side: int = 8192
    max_image_working_pixels: int = 67_108_864
    max_prompt_chars: int = 100_000
    max_stop_sequences: int = 4
    max_stop_chars: int = 200
    body_timeout_s: float = 30.0

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_side, self.max_image_pixels, self.max_image_working_pixels)


@dataclass(frozen=True)
class ChatRequest:
    prompt: Prompt
    sampling: Sampling
    stream: bool
    prompt_tokens: int


# The request's shape. Strict: `true` is not a number and "3" is not an integer; unknown fields
# (OpenAI has many this server does not use) are ignored.
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _ImageURL(_Strict):
    url: str


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: _ImageURL


class _Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Annotated[Union[_TextPart, _ImagePart], Field(discriminator="type")]]]


class _ChatCompletion(_Strict):
    messages: list[_Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; it wins when both are given
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = 1


def parse_chat_request(
    body: bytes,
    limits: Limits,
    default_sampling: Sampling,
    served_model: str,
    count_prompt_tokens: Callable[[Prompt], int],
    check_image_size: Callable[[int, int], None] | None = None,
) -> ChatRequest:
    """``check_image_size(width, height)`` raises DataError for an image the model's preprocessing
    could not afford (its padded square, say); the sides and area of ``limits`` are checked anyway."""
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes is over the limit of {limits.max_request_bytes}")
    request = _validated(_json(body))
    if request.model is not None and request.model != served_model:
        raise RequestError(404, f"model {request.model!r} is not served here; this server serves {served_model!r}",
                           "model", "model_not_found")
    if request.n != 1:
        raise RequestError(400, "n > 1 is not supported", "n")
    sampling = _sampling(request, limits, default_sampling)
    _check_text_length(request, limits)
    system, turns, image = _conversation(request.messages, limits, check_image_size)
    prompt = Prompt(turns, image, system)
    try:
        prompt_tokens = count_prompt_tokens(prompt)
    except DataError as exc:
        raise RequestError(400, str(exc), "messages") from None
    if prompt_tokens > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt is {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                           "messages", "context_length_exceeded")
    return ChatRequest(prompt, sampling, request.stream, prompt_tokens)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _validated(request: Any) -> _ChatCompletion:
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return _ChatCompletion.model_validate(request)
    except ValidationError as exc:
        # The deepest error says most: for content (a string or a list of parts) it is the list's.
        error = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        param = _param(error["loc"])
        raise RequestError(400, f"{param}: {error['msg']}" if param else error["msg"], param or None) from None


def _param(location: tuple) -> str:
    """pydantic's ('messages', 0, 'content', 'list[...]', 0, 'text', 'text') as 'messages[0].content[0].text':
    the union branches' type names and the discriminator's tag (repeated by its field) are dropped."""
    text, previous = "", None
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != previous and part != "str" and "[" not in part:
            text += f".{part}" if text else part
        previous = part
    return text


def _check_text_length(request: _ChatCompletion, limits: Limits) -> None:
    """Characters are counted before anything is tokenized: a 20 MB text never reaches the tokenizer."""
    chars = 0
    for index, message in enumerate(request.messages):
        parts = [message.content] if isinstance(message.content, str) else [
            p.text for p in message.content if isinstance(p, _TextPart)]
        for text in parts:
            _check_unicode(text, f"messages[{index}].content")
            chars += len(text)
    if chars > limits.max_prompt_chars:
        raise RequestError(400, f"the messages hold {chars} characters, over the limit of {limits.max_prompt_chars}",
                           "messages", "context_length_exceeded")


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(400, f"{param}: not valid Unicode ({exc.reason} at character {exc.start})", param) from None


def _conversation(
    messages: list[_Message], limits: Limits, check_image_size: Callable[[int, int], None] | None
) -> tuple[str | None, list[dict], Image.Image | None]:
    system, turns, image = None, [], None
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if message.role == "system":
            if index != 0:
                raise RequestError(400, f"{param}.role='system': a system message comes first, and once", param)
            if not isinstance(message.content, str) and any(isinstance(p, _ImagePart) for p in message.content):
                raise RequestError(400, f"{param}.content must be text", param)
            system = _text(message.content)
            continue
        text = _text(message.content)
        if IMAGE_TOKEN in text:
            # The model reads the image where this marker stands: in text it would ask for an image
            # the request does not have, or a second one.
            raise RequestError(400, f"{param}.content contains {IMAGE_TOKEN!r}, which marks the image's place for "
                               "this model; send images as image_url parts and remove it from the text", param)
        images = [] if isinstance(message.content, str) else [p for p in message.content if isinstance(p, _ImagePart)]
        if images:
            if image is not None or len(images) > 1:
                raise RequestError(400, "one image per conversation: this model reads a single image", param)
            image = load_image_url(images[0].image_url.url, limits, f"{param}.content", check_image_size)
            text = f"{IMAGE_TOKEN}\n{text}"
        expected = "human" if len(turns) % 2 == 0 else "gpt"
        if ROLES[message.role] != expected:
            raise RequestError(400, f"{param}: turns must alternate user, assistant, user, ...", param)
        turns.append({"from": ROLES[message.role], "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise RequestError(400, "the last message must be the user's", "messages")
    return system, turns, image


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content if isinstance(p, _TextPart))


def load_image_url(
    url: str, limits: Limits, param: str = "image_url", check_image_size: Callable[[int, int], None] | None = None
) -> Image.Image:
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
    return _decode(data, limits, param, check_image_size)


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RequestError(400, f"{param}: could not fetch {url}: {exc}", param) from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{param}: the image is over the limit of {limits.max_image_bytes} bytes", param)
    return data


def _decode(data: bytes, limits: Limits, param: str, check_image_size: Callable[[int, int], None] | None) -> Image.Image:
    try:
        # From the header, before any pixel is decoded.
        size = header_size(data)
        if size is None:
            raise RequestError(400, f"{param}: not an image (no image format recognised)", param)
        limits.image_limits.check_size(*size)
        if check_image_size is not None:
            check_image_size(*size)
    except DataError as exc:
        raise RequestError(413, f"{param}: {exc}", param) from None
    try:
        return decode_image(data, limits.image_limits).convert("RGB")
    except DataError as exc:
        raise RequestError(400, f"{param}: {exc}", param) from None


def _sampling(request: _ChatCompletion, limits: Limits, default: Sampling) -> Sampling:
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = default.max_new_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens={max_tokens}: must be a positive integer", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > limits.max_stop_sequences:
        raise RequestError(400, f"stop has {len(stop)} strings, over the limit of {limits.max_stop_sequences}", "stop")
    for text in stop:
        _check_unicode(text, "stop")
        if len(text) > limits.max_stop_chars:
            raise RequestError(400, f"a stop string of {len(text)} characters is over the limit of "
                               f"{limits.max_stop_chars}", "stop")
    temperature = default.temperature if request.temperature is None else request.temperature
    top_p = default.top_p if request.top_p is None else request.top_p
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2):
        raise RequestError(400, f"temperature={temperature}: must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2]",
                           "temperature")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError(400, f"top_p={top_p}: must be in (0, 1]", "top_p")
    return Sampling(max_tokens, float(temperature), float(top_p), tuple(s for s in stop if s))
