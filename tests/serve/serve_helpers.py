"""A real `haipai serve` process for the tests of a module: started on 127.0.0.1 with a free port (port 0;
the server prints the address it bound), ready once GET /health answers, stopped with SIGTERM.

(Imported as `from serve_helpers import ...`: pytest puts this folder on sys.path for its test modules.)"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "tests" / "fixtures" / "legacy" / "ec_mod.ckpt"  # max_seq_len 64, n_recursions 2
MODEL = "ec_mod"

def _command() -> list[str]:
    return [sys.executable, "-m", "haipai_lightning.cli.main", "serve"]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    @property
    def base(self) -> str:  # the OpenAI client's base_url
        return self.url + "/v1"

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict[str, float]:
        from haipai_lightning.serve.metrics import scrape

        status, text = self.get("/metrics")
        assert status == 200
        return scrape(text)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(*args: str, timeout: float = 90) -> Server:
    log = Path(tempfile.mkstemp(prefix="haipai-serve-", suffix=".log")[1])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [*_command(), "--ckpt_path", str(CKPT), "--host", "127.0.0.1", "--port", "0", "--model_name", MODEL,
           "--log_level", "warning", "--threads", "1", *args]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    deadline = time.monotonic() + timeout
    url, out = None, b""
    try:
        while url is None:  # the line naming the bound address (raw reads: select sees no buffered data)
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError(f"haipai serve did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                out += os.read(proc.stdout.fileno(), 4096)
                for line in out.decode(errors="replace").splitlines(keepends=True):
                    if line.startswith("haipai serve: ") and line.endswith("\n"):
                        url = line.split()[2].removesuffix("/v1")
        server = Server(proc, url, log)
        while True:
            try:
                if server.get("/health", timeout=2)[0] == 200:
                    return server
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"haipai serve never became healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the process we started, by its handle
            proc.wait()
            raise AssertionError(f"haipai serve did not exit within {timeout}s of SIGTERM")
    return proc.returncode


def load_reference():
    """The fixture model in this process: greedy references as `haipai generate --temperature 0` computes them."""
    from haipai_lightning.io.loader import load_model

    model, tok = load_model(str(CKPT))
    return model, tok, tok.token_to_id("<|endoftext|>") or 0
