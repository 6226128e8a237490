"""Soak ``python -m mmkit.serve``: thousands of mixed good and bad requests on 127.0.0.1.

    python experiments/soak/serve_soak.py --model RUN_FOLDER --requests 2000 --json soak.json

Every good request must be answered with exactly the reply the same prompt got when it was asked
alone before the soak (greedy decoding), every bad one with a 4xx JSON error, and the server must
stay up. The server's resident memory is sampled throughout; the report gives its peak and its
growth from the first tenth of the soak to the end. Exit status 1 on any wrong answer.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Where is the square?",
             "Is there a red triangle?", "Describe the image.", "Which is larger?"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def huge_png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels."""
    small = png(Image.new("RGB", (8, 8), (10, 20, 30)))
    header = small[12:29]
    patched = header[:4] + struct.pack(">II", width, height) + header[12:]
    return small[:12] + patched + struct.pack(">I", zlib.crc32(patched)) + small[33:]


def chat(messages: list[dict], **fields: Any) -> bytes:
    return json.dumps({"model": "soak", "messages": messages, **fields}).encode()


def with_image(url: str, question: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": question}]}]


CHAT = "/v1/chat/completions"


def bad_requests(rng: random.Random) -> dict[str, Callable[[], tuple[bytes, dict[str, str], str]]]:
    """Each kind of bad request: () -> (body, extra headers, path)."""

    def to_chat(body: Callable[[], bytes], headers: dict[str, str] | None = None) -> Callable[[], tuple[bytes, dict[str, str], str]]:
        return lambda: (body(), headers or {}, CHAT)

    def noise(size: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(size))

    hello = [{"role": "user", "content": "hi"}]
    return {
        "not JSON": to_chat(lambda: b"{this is not json"),
        "random bytes": to_chat(lambda: noise(rng.randint(1, 300))),
        "empty body": to_chat(lambda: b""),
        "no messages": to_chat(lambda: json.dumps({"model": "soak"}).encode()),
        "messages not a list": to_chat(lambda: chat("hello")),  # type: ignore[arg-type]
        "bad base64": to_chat(lambda: chat(with_image("data:image/png;base64,@@@"))),
        "not an image": to_chat(lambda: chat(with_image(data_url(noise(200))))),
        "20000x20000 image": to_chat(lambda: chat(with_image(data_url(huge_png_header(20000, 20000))))),
        "prompt over the limit": to_chat(lambda: chat([{"role": "user", "content": "describe " * 600}])),
        "max_tokens over the limit": to_chat(lambda: chat(hello, max_tokens=10**6)),
        "temperature not a number": to_chat(lambda: chat(hello, temperature="hot")),
        "remote image": to_chat(lambda: chat(with_image("http://127.0.0.1:1/x.png"))),
        "wrong model": to_chat(lambda: json.dumps({"model": "gpt-4", "messages": hello}).encode()),
        "assistant last": to_chat(lambda: chat([{"role": "assistant", "content": "hi"}])),
        "Content-Length not a number": to_chat(lambda: b"{}", {"Content-Length": "abc"}),
        "body over the limit": to_chat(lambda: b"x" * 300_000),
        "unknown path": lambda: (chat(hello), {}, "/v1/nowhere"),
        # Issue 25's hostile requests: each must fail alone, with a 4xx, fast.
        "<image> in the text": to_chat(lambda: chat([{"role": "user", "content": "<image> what is this?"}])),
        "40000x1 image": to_chat(lambda: chat(with_image(data_url(png(Image.new("RGB", (40000, 1))))))),
        "100000x1 image": to_chat(lambda: chat(with_image(data_url(huge_png_header(100000, 1))))),
        "text over the character limit": to_chat(lambda: chat([{"role": "user", "content": "a" * 150_000}])),
        "stop string too long": to_chat(lambda: chat(hello, stop="x" * 1000)),
        "too many stop strings": to_chat(lambda: chat(hello, stop=[str(i) for i in range(50)])),
        "temperature NaN": to_chat(lambda: chat(hello).replace(b"}]}", b"}], \"temperature\": NaN}")),
        "temperature 1e-300": to_chat(lambda: chat(hello, temperature=1e-300)),
        "max_tokens true": to_chat(lambda: chat(hello, max_tokens=True)),
        "5000-digit integer": to_chat(lambda: chat(hello).replace(b"}]}", b"}], \"max_tokens\": " + b"9" * 5000 + b"}")),
        "100000-deep nesting": to_chat(lambda: b"[" * 100_000 + b"]" * 100_000),
        "lone surrogate": to_chat(lambda: chat([{"role": "user", "content": "\ud800"}])),
        "text/plain body": to_chat(lambda: chat(hello), {"Content-Type": "text/plain"}),
    }


# Refused by the HTTP layer (uvicorn's h11) before the app sees them: a 4xx, in plain text.
FRAMING_ERRORS = {"Content-Length not a number"}


def post(port: int, body: bytes, headers: dict[str, str], path: str = CHAT) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", headers.get("Content-Type", "application/json"))
        connection.putheader("Content-Length", headers.get("Content-Length", str(len(body))))
        for name, value in headers.items():
            if name not in ("Content-Type", "Content-Length"):
                connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading a body it refuses
        response = connection.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return response.status, {"text": body.decode(errors="replace")}
    finally:
        connection.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


SOAK_SETTINGS = ["served_model_name=soak", "batch_size=8", "batch_wait_ms=20", "defaults_for_requests.max_tokens=8",
                 "limits.max_prompt_tokens=400", "limits.max_request_bytes=200000", "limits.max_tokens=64"]


def start_server(model: str | Path, *overrides: str) -> tuple[subprocess.Popen, int]:
    """``python -m mmkit.serve model=MODEL OVERRIDES`` on a free port of 127.0.0.1: (process, port)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mmkit.serve", f"model={model}", "port=0", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    if "serving" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line}{process.stderr.read()[-3000:]}")
    return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def soak(model: str, requests: int, good_share: float, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    colours = [(200, 40, 40), (40, 160, 60), (50, 60, 200), (220, 200, 40)]
    images = [png(Image.new("RGB", (48, 48), colour)) for colour in colours]
    prompts = [(question, image) for question in QUESTIONS for image in range(len(images))]
    bad = bad_requests(rng)
    process, port = start_server(model, *SOAK_SETTINGS)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.is_set() and process.poll() is None:
            samples.append((time.perf_counter(), rss_bytes(process.pid)))
            stop.wait(0.05)

    try:
        # The reference: each prompt asked alone, before any load.
        reference = {}
        for index, (question, image) in enumerate(prompts):
            status, payload = post(port, chat(with_image(data_url(images[image]), question)), {})
            assert status == 200, payload
            reference[index] = payload["choices"][0]["message"]["content"]
        plan = [("good", rng.randrange(len(prompts))) if rng.random() < good_share else ("bad", rng.choice(sorted(bad)))
                for _ in range(requests)]
        monitor = threading.Thread(target=sample_memory, daemon=True)
        monitor.start()
        started = time.perf_counter()

        def send(item: tuple[str, Any]) -> tuple[str, Any, int, dict]:
            kind, which = item
            if kind == "good":
                question, image = prompts[which]
                body, headers, path = chat(with_image(data_url(images[image]), question)), {}, CHAT
            else:
                body, headers, path = bad[which]()
            try:
                status, payload = post(port, body, headers, path)
            except (http.client.HTTPException, ConnectionError) as error:
                status, payload = -1, {"transport error": repr(error)}
            return kind, which, status, payload

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(send, plan))
        seconds = time.perf_counter() - started
        stop.set()
        monitor.join()
        alive = process.poll() is None
        health = json.loads(_get(port, "/health")) if alive else {}
    finally:
        stop.set()
        process.terminate()
        process.wait(timeout=30)

    wrong = []
    for kind, which, status, payload in results:
        if kind == "good":
            answer = payload.get("choices", [{}])[0].get("message", {}).get("content") if status == 200 else None
            if answer != reference[which]:
                wrong.append({"kind": "good", "prompt": which, "status": status, "answer": answer,
                              "expected": reference[which]})
        elif not (400 <= status < 500 and (payload.get("error", {}).get("message") or which in FRAMING_ERRORS)):
            wrong.append({"kind": which, "status": status, "payload": payload})
    first_tenth = [rss for moment, rss in samples if moment <= samples[0][0] + seconds / 10] if samples else [0]
    last_tenth = [rss for moment, rss in samples if moment >= samples[-1][0] - seconds / 10] if samples else [0]
    return {
        "requests": requests,
        "good": sum(1 for kind, *_ in results if kind == "good"),
        "bad": sum(1 for kind, *_ in results if kind == "bad"),
        "bad_kinds": sorted(bad),
        "distinct_reference_replies": len(set(reference.values())),
        "wrong": wrong[:20],
        "wrong_count": len(wrong),
        "connection_errors": sum(1 for *_, status, _ in results if status == -1),  # resets, refused connections
        "concurrency": concurrency,
        "server_alive_at_end": alive,
        "health": health,
        "seconds": round(seconds, 1),
        "requests_per_s": round(requests / seconds, 1),
        "peak_rss_mib": round(max(rss for _, rss in samples) / 2**20, 1) if samples else None,
        "rss_first_tenth_mib": round(max(first_tenth) / 2**20, 1),
        "rss_last_tenth_mib": round(max(last_tenth) / 2**20, 1),
        "memory_samples": len(samples),
    }


def _get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    body = connection.getresponse().read()
    connection.close()
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run folder python -m mmkit.serve can load")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--good-share", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(300)
    report = soak(args.model, args.requests, args.good_share, args.concurrency, args.seed)
    print(f"{report['requests']} requests ({report['good']} good, {report['bad']} bad of {len(report['bad_kinds'])} kinds) "
          f"from {report['concurrency']} clients at once in {report['seconds']} s, {report['requests_per_s']} requests/s; "
          f"wrong: {report['wrong_count']}; connection errors: {report['connection_errors']}; "
          f"server alive: {report['server_alive_at_end']}; peak RSS {report['peak_rss_mib']} MiB "
          f"(first tenth {report['rss_first_tenth_mib']} MiB, last tenth {report['rss_last_tenth_mib']} MiB)")
    for item in report["wrong"][:5]:
        print("  wrong:", json.dumps(item)[:300])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["wrong_count"] == 0 and report["server_alive_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
