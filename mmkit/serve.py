"""Serve a trained model with an OpenAI-compatible API.

    python -m mmkit.serve model=outputs/2026-11-26/12-00-00 port=8000

``POST /v1/chat/completions`` (images as base64 ``data:`` URLs in ``image_url`` parts; http(s)
URLs only with ``limits.allow_remote_images=true``; ``stream: true`` for server-sent events),
``GET /v1/models``, ``GET /health``; a chat page at ``GET /`` (``web_page=false`` turns it off).
Concurrent requests are generated in batches.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mmkit.cli import hydra_command
from mmkit.core.errors import ConfigError


def serve(cfg: DictConfig) -> None:
    # Deferred: these import torch, transformers and Lightning; a bad command line is answered
    # before they load.
    from mmkit.inference.from_run import build_generator
    from mmkit.inference.generation import Sampling
    from mmkit.models.load import load_run, resolve_device
    from mmkit.serving.app import ChatServer
    from mmkit.serving.batcher import Batcher
    from mmkit.serving.requests import Limits

    if cfg.model is None:
        raise ConfigError("model=RUN_FOLDER is required: the run to serve")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be at least 1")
    try:
        limits = Limits(**cfg.limits)
    except TypeError as exc:
        raise ConfigError(f"limits: {exc}") from None
    defaults = cfg.defaults_for_requests
    default_sampling = Sampling(int(defaults.max_tokens), float(defaults.temperature), float(defaults.top_p))
    train_cfg, model = load_run(cfg.model)
    model.to(resolve_device(cfg.device))
    generator = build_generator(train_cfg, model, int(cfg.batch_size), default_sampling.max_new_tokens)
    name = cfg.served_model_name or Path(cfg.model).resolve().name
    try:
        server = ChatServer((cfg.host, int(cfg.port)), Batcher(generator, int(cfg.batch_size), float(cfg.batch_wait_ms)),
                            limits, default_sampling, name, web_page=bool(cfg.web_page))
    except OSError as exc:
        raise ConfigError(f"port={cfg.port}: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
    host, port = server.server_address[:2]
    page = f"; the chat page: http://{host}:{port}/" if cfg.web_page else ""
    print(f"serving {name} on http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health){page}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


main = hydra_command("serve", serve)

if __name__ == "__main__":
    main()
