"""`haipai serve`: an OpenAI-compatible HTTP server on the continuous depth-wise batching engine.

    protocol.py   POST /v1/completions bodies: parsing, validation, OpenAI-style errors
    textstream.py incremental detokenization with stop strings
    scheduler.py  the engine thread: requests join the running batch, tokens go back to each request
    metrics.py    Prometheus counters and gauges (GET /metrics)
    app.py        the FastAPI routes
    server.py     loading a model, running uvicorn, graceful SIGTERM

The heavy imports (torch, FastAPI) live in those modules; this package file imports nothing.
"""
