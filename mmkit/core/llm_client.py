"""One client for OpenAI-compatible chat endpoints, shared by the data teacher and the judges.

Any server that speaks ``POST {base_url}/chat/completions`` works: OpenAI, a local vLLM or
llama.cpp server, mmkit's own ``mmkit.serve``. Only the standard library is used.

- 429, 5xx and connection errors are retried with exponential backoff and jitter (a server's
  ``Retry-After`` is honoured); any other 4xx fails at once with the status and the server's
  message.
- Replies are cached on disk under a hash of (base_url, model, messages, temperature,
  max_tokens), each written atomically, so a re-run, or a resumed one, pays for nothing twice.
- Errors name the config keys under ``key`` (e.g. ``teacher.model``, ``task.judge.model``).
"""
from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.cache import mmkit_home
from mmkit.core.errors import ConfigError, DataError

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# Longest wait a server's Retry-After may impose on one retry.
_MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
    """A failure worth another try (429, 5xx, a connection problem)."""

    def __init__(self, description: str, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after


# OpenAI's rule of thumb for English text; without the model's tokenizer (none is downloaded), counts
# made with it are estimates, which a real tokenizer may put 10-20% higher or lower.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is, at :data:`CHARS_PER_TOKEN` characters a token."""
    return -(-len(text) // CHARS_PER_TOKEN)


class ChatClient:
    """Chat completions from one model at one endpoint, cached and retried.

    ``api_key_env`` names the environment variable holding the key (sent as a Bearer token);
    ``None`` sends no Authorization header, for local servers that take no key.
    """

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.7,
        max_tokens: int = 1024,
        concurrency: int = 4,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        cache_dir: str | Path | None = None,
        key: str = "teacher",
    ) -> None:
        self.key = key
        parsed = urllib.parse.urlparse(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(
                f"{key}.base_url={base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1"
            )
        if not model:
            raise ConfigError(f"{key}.model: name the chat model to ask (e.g. {key}.model=gpt-4o)")
        self.base_url = str(base_url).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = str(model)
        self.temperature = self._number("temperature", temperature, float, minimum=0.0)
        self.max_tokens = self._number("max_tokens", max_tokens, int, minimum=1)
        self.concurrency = self._number("concurrency", concurrency, int, minimum=1)
        self.max_retries = self._number("max_retries", max_retries, int, minimum=0)
        self.backoff_s = self._number("backoff_s", backoff_s, float, minimum=0.0)
        self.timeout_s = self._number("timeout_s", timeout_s, float, minimum=1e-3)
        self.api_key = self._api_key(api_key_env)
        if cache_dir is None:
            cache_dir = mmkit_home() / "llm_cache"
        self.cache_dir = Path(cache_dir)
        proxies = {} if parsed.hostname in _LOOPBACK else None  # never send loopback traffic to a proxy
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        self._lock = threading.Lock()
        self.requests_sent = 0  # HTTP requests actually made (cache hits are not requests)
        self.cache_hits = 0
        # Tokens of the replies the server wrote (its "usage", else estimated), for tokens/s.
        self.completion_tokens = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], key: str, **defaults: Any) -> "ChatClient":
        """A client from config options (``defaults`` fill what they leave out); an unknown option
        is a ConfigError naming ``key.<option>``."""
        accepted = set(inspect.signature(cls).parameters) - {"key"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: not an option of an OpenAI-compatible client; use {', '.join(sorted(accepted))}"
            )
        return cls(**{**defaults, **options}, key=key)

    def stats(self) -> dict[str, int]:
        return {"requests sent": self.requests_sent, "replies from the cache": self.cache_hits,
                "reply tokens": self.completion_tokens}

    def cache_key(self, messages: list[dict[str, str]], sample: int = 0) -> str:
        identity = {
            "base_url": self.base_url, "model": self.model, "messages": messages,
            "temperature": self.temperature, "max_tokens": self.max_tokens,
        }
        if sample:
            identity["sample"] = sample
        return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def complete(
        self,
        messages: list[dict[str, str]],
        sample: int = 0,
        accept: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """``{"content", "finish_reason"}`` of the model's reply, from the cache when it has it.

        ``sample`` k > 0 asks for the k-th independent reply to the same messages (cached apart),
        as repeated judge runs need. A reply that ``accept`` rejects (e.g. no parsable score) is
        never cached and is asked again, up to ``max_retries`` times, then raises DataError.
        """
        key = self.cache_key(messages, sample)
        path = self.cache_dir / key[:2] / f"{key}.json"
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(cached, dict) and "content" in cached and (accept is None or accept(cached)):
                with self._lock:
                    self.cache_hits += 1
                return cached
        except (OSError, ValueError):
            pass  # not cached yet (or unreadable): ask the server
        for _ in range(self.max_retries + 1):
            reply = self._request(messages)
            if accept is None or accept(reply):
                write_text_atomically(path, json.dumps(reply, ensure_ascii=False))
                return reply
        raise DataError(
            f"request to {self.url}: {self.max_retries + 1} replies in a row were unusable; "
            f"last: {str(reply.get('content'))[:200]!r}"
        )

    def _request(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._post(body, headers)
            except _Retryable as exc:
                if attempt + 1 == attempts:
                    raise DataError(
                        f"request to {self.url} failed after {attempts} attempt(s); last: {exc}"
                    ) from None
                delay = self.backoff_s * 2**attempt * (0.5 + random.random())  # jitter: 0.5x to 1.5x
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _MAX_RETRY_AFTER_S))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests_sent += 1
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            message = _server_message(exc)
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {message}", _retry_after(exc.headers)) from None
            raise DataError(f"request to {self.url} failed with HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"connection error: {reason}") from None
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(
                f"request to {self.url}: the reply is not a chat completion: {raw[:200]!r}"
            ) from None
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        with self._lock:
            self.completion_tokens += tokens if isinstance(tokens, int) else estimate_tokens(content or "")
        return {"content": content, "finish_reason": choice.get("finish_reason")}

    def _number(self, name: str, value: Any, kind: type, minimum: float) -> Any:
        try:
            number = kind(value)
            if kind is int and number != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{self.key}.{name}={value!r}: expected a{'n integer' if kind is int else ' number'}") from None
        if number < minimum:
            raise ConfigError(f"{self.key}.{name}={value!r}: must be at least {minimum}")
        return number

    def _api_key(self, api_key_env: str | None) -> str | None:
        if api_key_env is None:
            return None
        key = os.environ.get(str(api_key_env))
        if not key:
            raise ConfigError(
                f"{self.key}.api_key_env={api_key_env!r}: the environment variable {api_key_env} is not set; "
                f"set it to the API key, or set {self.key}.api_key_env to null for a server that takes no key"
            )
        return key


def _server_message(exc: urllib.error.HTTPError) -> str:
    """The error message an OpenAI-style server put in its body (``{"error": {"message"}}``)."""
    try:
        raw = exc.read()
    except Exception:  # the body is a courtesy; the status alone still says what happened
        raw = b""
    finally:
        exc.close()
    text = raw.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    except ValueError:
        pass
    return text[:300] or str(exc.reason or "no message")


def _retry_after(headers: Any) -> float | None:
    try:
        value = float(headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None
    return value if value >= 0 else None
