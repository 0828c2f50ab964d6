"""`haipai serve` flag checks: one ConfigError line each, before anything is loaded."""

from __future__ import annotations

import socket

import pytest

from haipai_lightning.cli.serve import serve_command
from haipai_lightning.config import ConfigError
from serve_helpers import CKPT


@pytest.mark.parametrize("kw,match", [
    ({}, "--ckpt_path"),
    ({"ckpt_path": str(CKPT), "export": "x"}, "one of"),
    ({"ckpt_path": str(CKPT), "port": 70000}, "--port"),
    ({"ckpt_path": str(CKPT), "max_batch": 0}, "--max_batch"),
    ({"ckpt_path": str(CKPT), "max_queue": -1}, "--max_queue"),
    ({"ckpt_path": str(CKPT), "shutdown_timeout": 0}, "--shutdown_timeout"),
    ({"ckpt_path": str(CKPT), "log_level": "loud"}, "--log_level"),
    ({"ckpt_path": str(CKPT), "model_name": " "}, "--model_name"),
])
def test_bad_flags(kw, match):
    with pytest.raises(ConfigError, match=match):
        serve_command(**kw)


def test_a_busy_port_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            serve_command(ckpt_path="/nonexistent.ckpt", port=s.getsockname()[1])
