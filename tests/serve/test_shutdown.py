"""SIGTERM: the server stops accepting connections, lets in-flight requests finish, and exits 0 promptly."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx

from serve_helpers import start_server, stop_server


def test_sigterm_drains_in_flight_requests_and_exits_0():
    server = start_server("--max_batch", "2", "--max_queue", "10", "--shutdown_timeout", "20")
    try:
        # 12 prompts x 50 tokens through 2 slots: a second or more of work in flight when SIGTERM arrives
        body = {"prompt": ["a"] * 12, "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.base + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            time.sleep(0.5)  # uvicorn notices the signal within its 0.1 s main-loop tick and closes the listener
            refused = False
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
            except OSError:
                refused = True
            rest = [l for l in lines if l]
        assert refused, "the server still accepted connections after SIGTERM"
        assert rest[-1] == "data: [DONE]"
        finished = [c for l in rest[:-1] for c in json.loads(l[6:])["choices"] if c["finish_reason"]]
        assert sorted(c["index"] for c in finished) == list(range(12))  # every in-flight choice completed
        assert {c["finish_reason"] for c in finished} == {"length"}
        code = server.proc.wait(timeout=15)
        assert code == 0, server.stderr()[-3000:]
        assert time.monotonic() - t0 < 15
        assert "Traceback" not in server.stderr(), server.stderr()[-3000:]
    finally:
        stop_server(server.proc)
