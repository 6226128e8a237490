"""Serve a trained model with an OpenAI-compatible API.

    python -m mmkit.serve model=outputs/2026-11-26/12-00-00 port=8000

``POST /v1/chat/completions`` (images as base64 ``data:`` URLs in ``image_url`` parts; http(s)
URLs only with ``limits.allow_remote_images=true``; ``stream: true`` for server-sent events),
``GET /v1/models``, ``GET /health``; a chat page at ``GET /`` (``web_page=false`` turns it off).
Concurrent requests are generated in batches. ``'api_keys=[KEY]'`` asks clients for
``Authorization: Bearer KEY``; ``'cors_origins=[https://...]'`` lets those pages call the API.
"""
from __future__ import annotations

import socket
from pathlib import Path

from omegaconf import DictConfig

from mmkit.cli import hydra_command
from mmkit.core.errors import ConfigError


def serve(cfg: DictConfig) -> None:
    # Deferred: these import torch, transformers, Lightning and uvicorn; a bad command line is
    # answered before they load.
    import uvicorn

    from mmkit.inference.from_run import build_generator
    from mmkit.inference.generation import Sampling
    from mmkit.models.load import load_run, resolve_device
    from mmkit.serving.app import ServerSettings, create_app
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
    api_keys = tuple(str(key) for key in cfg.api_keys or ())
    if any(not key for key in api_keys):
        raise ConfigError("api_keys: an empty key would let anyone in; give each key some text")
    defaults = cfg.defaults_for_requests
    default_sampling = Sampling(int(defaults.max_tokens), float(defaults.temperature), float(defaults.top_p))
    listener = _listen(cfg.host, int(cfg.port), int(cfg.backlog))
    train_cfg, model = load_run(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model.to(resolve_device(cfg.device))
    generator = build_generator(train_cfg, model, int(cfg.batch_size), default_sampling.max_new_tokens,
                                image_limits=limits.image_limits)
    name = cfg.served_model_name or Path(cfg.model).resolve().name
    settings = ServerSettings(limits, default_sampling, name, web_page=bool(cfg.web_page), api_keys=api_keys,
                              cors_origins=tuple(str(origin) for origin in cfg.cors_origins or ()))
    app = create_app(Batcher(generator, int(cfg.batch_size), float(cfg.batch_wait_ms)), settings)
    host, port = listener.getsockname()[:2]
    page = f"; the chat page: http://{host}:{port}/" if cfg.web_page else ""
    keys = f"; API keys: {len(api_keys)}" if api_keys else ""
    print(f"serving {name} on http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health)"
          f"{page}{keys}", flush=True)
    # uvicorn's own lines (startup, each request) stay out of the way; errors still print.
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                           backlog=int(cfg.backlog), timeout_keep_alive=int(cfg.keep_alive_s)))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is said at once;
    connections made before the server's loop runs wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"port={port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    return listener


main = hydra_command("serve", serve)

if __name__ == "__main__":
    main()
