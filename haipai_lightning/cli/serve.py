"""`haipai serve`: an OpenAI-compatible HTTP server (POST /v1/completions) on the depth-wise batching
engine (haipai_lightning/serve/, docs/serving.md)."""

from __future__ import annotations

import os

from haipai_lightning.config import ConfigError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve_command(
    ckpt_path: str | None = None,
    export: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    model_name: str | None = None,
    shutdown_timeout: float = 10.0,
    threads: int | None = None,
    log_level: str = "info",
    access_log: bool = False,
    lookup: str | None = None,
) -> None:
    """Serve a trained model over HTTP with the OpenAI completions API (continuous depth-wise batching).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        export: or an export directory (`haipai export --out DIR`).
        host: address to listen on; 127.0.0.1 = this machine only (the server has no authentication).
        port: TCP port (0 = a free one; the address is printed).
        max_batch: request slots decoded together by the engine.
        max_queue: requests that may wait for a slot; more are answered 429.
        model_name: the id clients pass as "model" (default: the --ckpt_path / --export path as given).
        shutdown_timeout: seconds in-flight requests get to finish after SIGTERM before they are cancelled.
        threads: torch CPU threads (null = torch's default).
        log_level: uvicorn's log level (critical, error, warning, info, debug, trace).
        access_log: log one line per HTTP request.
        lookup: an LMLM fact store (SQLite, haipai_lightning/decode/lookup.py): when the model writes a lookup
            call its value is read from the store and inserted (a model trained with data.lmlm=true).
    """
    if (ckpt_path is None) == (export is None):
        raise ConfigError("pass one of --ckpt_path (a .ckpt) or --export (an export directory)")
    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in [0, 65535] (0 = a free one)")
    if max_batch < 1:
        raise ConfigError(f"--max_batch {max_batch} must be >= 1 (request slots decoded together)")
    if max_queue < 0:
        raise ConfigError(f"--max_queue {max_queue} must be >= 0 (requests waiting for a slot)")
    if not shutdown_timeout > 0:
        raise ConfigError(f"--shutdown_timeout {shutdown_timeout} must be > 0 (seconds)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1 (or null: torch's default)")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log_level {log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    if model_name is not None and not model_name.strip():
        raise ConfigError("--model_name must not be empty")
    from haipai_lightning.serve.server import bind, run

    sock = bind(host, port)  # before loading: a busy port fails at once
    import torch

    from haipai_lightning.serve.app import build_app

    if threads is not None:
        torch.set_num_threads(threads)
    if ckpt_path is not None:
        from haipai_lightning.io.loader import load_model

        model, tok = load_model(ckpt_path)
    else:
        from haipai_lightning.io.export import load_pretrained

        model, tok = load_pretrained(export)
    source = ckpt_path if ckpt_path is not None else export
    if tok is None:
        raise ConfigError(f"{source!r} holds no tokenizer; it was not trained through a Haipai data module")
    hook = None
    if lookup is not None:
        from haipai_lightning.decode.lookup import FactStore, LookupHook

        hook = LookupHook(FactStore(lookup), tok)  # a tokenizer without the markers: one-line ConfigError
    try:
        app = build_app(model, tok, model_name or os.fspath(source), max_batch, max_queue, lookup=hook)
    except ValueError as e:  # the engine's requirements (a cycle sharing strategy, a decoding router)
        raise ConfigError(f"{source!r} cannot be served: {e}") from None
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    print(f"haipai serve: {url}/v1 (model {model_name or source!r}, max_batch {max_batch}, max_queue {max_queue})",
          flush=True)
    run(app, sock, shutdown_timeout, log_level, access_log)
