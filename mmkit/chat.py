"""Talk to a trained model in the terminal, about one image, turn after turn.

    python -m mmkit.chat model=outputs/2026-11-26/12-00-00 image=photo.jpg

Replies stream as they are generated. The image is encoded once per conversation and its
embeddings reused every turn. Commands: ``/image PATH`` (a new image and a new conversation),
``/reset`` (forget the conversation), ``/quit`` (or end of input).
"""
from __future__ import annotations

import sys
from typing import Iterator, TextIO

from omegaconf import DictConfig

from mmkit.cli import hydra_command
from mmkit.core.errors import ConfigError, DataError
from mmkit.inference.chat_session import ChatSession, open_image
from mmkit.inference.generation import Sampling


def run_chat(session: ChatSession, lines: TextIO, out: TextIO) -> None:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text.startswith("/image"):
            try:
                session.set_image(open_image(text[len("/image"):].strip()))
                print("(new image, new conversation)", file=out, flush=True)
            except DataError as exc:
                print(f"error: {exc}", file=out, flush=True)
            continue
        print("ASSISTANT: ", end="", file=out, flush=True)
        for piece in session.reply(text):
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)


def chat(cfg: DictConfig) -> None:
    # Deferred: loading a run imports transformers and Lightning; a bad command line is answered
    # before they load.
    from mmkit.inference.from_run import build_generator
    from mmkit.models.load import load_run, resolve_device

    if cfg.model is None:
        raise ConfigError("model=RUN_FOLDER is required: the run to chat with")
    sampling = Sampling(
        max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature), top_p=float(cfg.top_p),
        stop=tuple(cfg.stop),
    )
    image = open_image(cfg.image) if cfg.image else None
    train_cfg, model = load_run(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model.to(resolve_device(cfg.device))
    session = ChatSession(build_generator(train_cfg, model, 1, sampling.max_new_tokens), sampling)
    session.set_image(image)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {cfg.model}" + (f" about {cfg.image}" if cfg.image else "") +
              "; /image PATH, /reset, /quit", flush=True)
    try:
        run_chat(session, _prompted() if interactive else sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        print()


def _prompted() -> Iterator[str]:
    while True:
        try:
            yield input("USER: ")
        except EOFError:
            return


main = hydra_command("chat", chat)

if __name__ == "__main__":
    main()
