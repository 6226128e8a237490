"""python -m mmkit.serve as a real process on 127.0.0.1, spoken to by the official openai client."""
from __future__ import annotations

import http.client
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO
from PIL import Image

sys.path.insert(0, str(REPO / "experiments" / "soak"))
from serve_soak import data_url, huge_png_header, png, start_server  # noqa: E402  the soak's request builders

from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt, Sampling
from mmkit.serving.requests import Limits, RequestError, load_image_url
from mmkit.synth.world import generate_scenes, render

QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Where is the square?",
             "Is there a red triangle?", "Describe the image.", "Which is larger?", "What is in the top left?"]
LIMITS = ["limits.max_prompt_tokens=400", "limits.max_image_pixels=1000000", "limits.max_tokens=64"]


@pytest.fixture(scope="module")
def server(lively_run):
    process, port = start_server(lively_run, "served_model_name=lively", "batch_size=8", "batch_wait_ms=50",
                                 "defaults_for_requests.max_tokens=12", *LIMITS)
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def images():
    return [render(scene) for scene in generate_scenes("test", len(QUESTIONS), seed=3)]


def _messages(question: str, image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(image))}}, {"type": "text", "text": question},
    ]}]


def _expected(lively_model, question: str, image: Image.Image, max_new_tokens: int = 12) -> str:
    cfg, model = lively_model
    prompt = Prompt([{"from": "human", "value": f"<image>\n{question}"}], image)
    return build_generator(cfg, model, 1, max_new_tokens).answer([prompt], progress=False, sampling=Sampling(max_new_tokens))[0]


@pytest.mark.slow
def test_plain_and_streamed_completions_through_the_openai_client(client, lively_model, images):
    assert [m.id for m in client.models.list().data] == ["lively"]
    expected = _expected(lively_model, QUESTIONS[0], images[0])
    completion = client.chat.completions.create(model="lively", messages=_messages(QUESTIONS[0], images[0]))
    assert completion.choices[0].message.content == expected and expected
    cfg, model = lively_model
    prompt = Prompt([{"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}], images[0])
    (reply,) = build_generator(cfg, model, 1, 12).replies([prompt], Sampling(12))
    assert completion.usage.prompt_tokens == len(build_generator(cfg, model, 1, 12).prompt_ids(prompt))
    assert (completion.usage.completion_tokens, completion.choices[0].finish_reason) == (reply.completion_tokens, reply.finish_reason)

    stream = client.chat.completions.create(model="lively", messages=_messages(QUESTIONS[0], images[0]), stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1

    # A system message and a multi-turn history are part of the prompt.
    messages = [{"role": "system", "content": "Answer briefly."}, *_messages(QUESTIONS[0], images[0]),
                {"role": "assistant", "content": expected}, {"role": "user", "content": "Are you sure?"}]
    follow_up = client.chat.completions.create(model="lively", messages=messages, max_tokens=5)
    conversation = [{"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}, {"from": "gpt", "value": expected},
                    {"from": "human", "value": "Are you sure?"}]
    prompt = Prompt(conversation, images[0], system="Answer briefly.")
    assert follow_up.choices[0].message.content == build_generator(cfg, model, 1, 5).answer([prompt], progress=False)[0]


@pytest.mark.slow
def test_fifty_concurrent_requests_are_batched_and_all_answered_correctly(server, client, lively_model, images):
    requests = [(QUESTIONS[i % len(QUESTIONS)], images[(i * 3) % len(images)]) for i in range(50)]
    answers_by_pair = {}
    for question, image in requests:
        key = (question, id(image))
        if key not in answers_by_pair:
            answers_by_pair[key] = _expected(lively_model, question, image)

    def ask(pair):
        question, image = pair
        return client.chat.completions.create(model="lively", messages=_messages(question, image)).choices[0].message.content

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, requests))
    assert answers == [answers_by_pair[(q, id(im))] for q, im in requests]
    assert len(set(answers)) > 5
    assert _health(server)["largest_batch"] > 1  # they were generated together, not one by one


def _post(port: int, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


@pytest.mark.slow
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, images):
    def request(**fields) -> bytes:
        return json.dumps({"model": "lively", "messages": _messages(QUESTIONS[1], images[1]), **fields}).encode()

    def with_image_url(url: str) -> bytes:
        return json.dumps({"model": "lively", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}).encode()

    bad = {
        "not JSON": b"{this is not json",
        "bad base64": with_image_url("data:image/png;base64,@@@not-base64@@@"),
        "not an image": with_image_url(data_url(b"GIF89a but not really an image at all")),
        "20000x20000": with_image_url(data_url(huge_png_header(20000, 20000))),
        "prompt over the limit": json.dumps({"model": "lively", "messages": [
            {"role": "user", "content": "describe " * 500}]}).encode(),
        "max_tokens over the limit": request(max_tokens=100000),
        "remote image URL": with_image_url("http://127.0.0.1:1/image.png"),
        "wrong model": json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        "no user turn last": json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
    }
    for name, body in bad.items():
        status, payload = _post(server, body)
        assert 400 <= status < 500, (name, status, payload)
        assert payload["error"]["message"], name
        # ... and the next good request still succeeds.
        good = client.chat.completions.create(model="lively", messages=_messages(QUESTIONS[1], images[1]), max_tokens=4)
        assert good.choices[0].message.content is not None
    status, payload = _post(server, request(), path="/v1/nowhere")
    assert status == 404
    assert _health(server)["status"] == "ok"


def _health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


def test_remote_images_are_fetched_only_when_enabled(tmp_path):
    red_png = png(Image.new("RGB", (16, 16), (200, 0, 0)))

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(red_png)))
            self.end_headers()
            self.wfile.write(red_png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
    limits = dict(max_request_bytes=10**6, max_image_bytes=10**6, max_image_pixels=10**6, max_prompt_tokens=100,
                  max_tokens=10)
    try:
        with pytest.raises(RequestError, match="allow_remote_images=false"):
            load_image_url(url, Limits(**limits, allow_remote_images=False))
        image = load_image_url(url, Limits(**limits, allow_remote_images=True))
        assert image.size == (16, 16) and image.getpixel((3, 3)) == (200, 0, 0)
        with pytest.raises(RequestError, match="over the limit"):
            load_image_url(url, Limits(**{**limits, "max_image_bytes": 10}, allow_remote_images=True))
    finally:
        server.shutdown()


@pytest.mark.parametrize("web_page", [True, False])
def test_the_chat_page_is_served_offline_or_turned_off(web_page):
    import re

    from starlette.testclient import TestClient

    from mmkit.serving.app import ServerSettings, create_app

    settings = ServerSettings(Limits(**_limit_defaults()), Sampling(8), "m", web_page=web_page)
    with TestClient(create_app(batcher=None, settings=settings)) as http:
        response = http.get("/")
    body = response.text
    if not web_page:
        assert response.status_code == 404 and "no route GET /" in body
        return
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'fetch("/v1/chat/completions"' in body and "stream: true" in body
    # Nothing is loaded from elsewhere: no src/href to another host, no CDN.
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", body) and "@import" not in body


def _limit_defaults() -> dict:
    from omegaconf import OmegaConf

    from mmkit.core.config import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "serve.yaml").limits)
