"""Live servers for the tests: an in-process one over the fake executor (fast, default run) and
``llmc serve`` subprocesses over compiled artifacts; plus small HTTP helpers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Optional

from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.engine import Engine
from llmc.runtime.server import Server, build_asgi
from tests.runtime.fake import FakeExecutor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A running server: ``url``, and for in-process ones the engine to inspect."""

    def __init__(self, url: str, engine: Optional[Engine] = None, process=None):
        self.url, self.engine, self.process = url, engine, process

    def get(self, path: str, headers=None):
        return request("GET", self.url + path, headers=headers)

    def post(self, path: str, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request("POST", self.url + path, data, {"content-type": "application/json", **(headers or {})})

    def metrics(self) -> dict[str, float]:
        _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\d.eE]+|NaN)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["llmc_requests_running"] == 0 and m["llmc_requests_waiting"] == 0 and m["llmc_kv_blocks_used"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {m}")
            time.sleep(0.05)


def request(method: str, url: str, data: Optional[bytes] = None, headers=None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextmanager
def fake_server(api_key: Optional[str] = None, max_body_bytes: int = 1 << 16, tokenizer=None,
                max_concurrent: int = 256, executor_class=FakeExecutor, **engine_kwargs):
    """An in-process server over the fake executor (uvicorn on a thread, engine on its own)."""
    import uvicorn

    executor_kwargs = {k: engine_kwargs.pop(k) for k in list(engine_kwargs)
                       if k in ("num_blocks", "block_size", "max_model_len", "delay_per_token", "delay_per_step")}
    executor_kwargs.setdefault("delay_per_step", 0.002)
    engine = Engine(executor_class(**executor_kwargs), tokenizer, **engine_kwargs)
    async_engine = AsyncEngine(engine).start()
    server = Server(async_engine, "fake", api_key, max_body_bytes, max_concurrent=max_concurrent)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_asgi(server), host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", engine)
    finally:
        uv.should_exit = True
        thread.join(10)
        async_engine.shutdown()


@contextmanager
def llmc_serve(artifact: str, *args: str, env=None, ready_timeout: float = 60.0):
    """``llmc serve ARTIFACT`` as a subprocess, yielded once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmc.cli", "serve", artifact, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    live = Live(f"http://127.0.0.1:{port}", process=proc)
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llmc serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if live.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > ready_timeout:
                raise RuntimeError(f"llmc serve not ready after {ready_timeout}s")
            time.sleep(0.1)
        live.ready_seconds = time.monotonic() - t0
        yield live
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
