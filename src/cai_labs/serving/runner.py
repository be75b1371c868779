"""Run the service in the background, on a free loopback port, and always stop it.

Two ways, both context managers that yield the base URL (``http://127.0.0.1:<port>``):

* :class:`ServerThread` — uvicorn in a thread of this process: starts in a blink (the model is
  already imported), used by the tests. Client and server then share one interpreter (and its
  GIL), which slows both a little.
* :class:`ServerProcess` — ``python -m cai_labs.serving`` in a child process: what a deployment
  runs, used by the tutorial's and the benchmark's load tests so that the load generator does
  not compete with the server for the interpreter.

The port is chosen by the operating system: the socket is bound to port 0 on 127.0.0.1 before the
server starts, so two servers never race for a port.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:  # uvicorn and FastAPI are imported where a server is built
    import uvicorn
    from fastapi import FastAPI

__all__ = ["loopback_socket", "uvicorn_config", "ServerThread", "ServerProcess", "wait_healthy"]


def uvicorn_config(app: FastAPI, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's settings for an app of :func:`~cai_labs.serving.create_app`: its idle
    keep-alive comes from the app's :class:`~cai_labs.serving.ServeConfig` (``keep_alive_s``)."""
    import uvicorn

    keep_alive = app.state.service.config.keep_alive_s
    return uvicorn.Config(
        app, log_level=log_level, lifespan="on", access_log=False, timeout_keep_alive=keep_alive
    )


def loopback_socket(port: int = 0) -> socket.socket:
    """A listening-ready TCP socket bound to 127.0.0.1 (port 0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> dict:
    """Poll ``GET url/health`` until it answers 200; raise ``RuntimeError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server stopped before answering /health")
        try:
            r = httpx.get(f"{url}/health", timeout=2.0)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} not healthy after {timeout} s (last: {last})")


class ServerThread:
    """Serve ``app`` with uvicorn in a daemon thread, on 127.0.0.1 and a free port.

    Example::

        with ServerThread(create_app(ckpt)) as url:
            httpx.post(f"{url}/generate", json={"prompt": "Hi"})
    """

    def __init__(self, app: FastAPI, startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.sock = loopback_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app))
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            daemon=True,
            name=f"uvicorn-{self.port}",
        )
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        try:
            wait_healthy(self.url, self.startup_timeout, alive=self.thread.is_alive)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """Start ``python -m cai_labs.serving --checkpoint DIR --port 0 ...`` and stop it on exit.

    Args:
        checkpoint: the ``save_pretrained`` directory to serve.
        args: more command-line options, e.g. ``["--max-batch-size", "1"]``.
        startup_timeout: seconds to wait for the port line and ``/health``.
    """

    def __init__(
        self, checkpoint: str | Path, args: list[str] | None = None, startup_timeout: float = 120.0
    ) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "cai_labs.serving",
            "--checkpoint",
            str(checkpoint),
            "--port",
            "0",
            *(args or []),
        ]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.url = ""

    def __enter__(self) -> str:
        return self.start()

    def start(self) -> str:
        """Start the process, wait until ``/health`` answers, return the base URL. The process
        is also stopped when this interpreter exits, should :meth:`stop` never be called."""
        fd, name = tempfile.mkstemp(suffix=".log", prefix="cai_labs_serving_")
        self.log_path = Path(name)
        atexit.register(self.stop)
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])  # the child imports this cai_labs
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        with os.fdopen(fd, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
        try:
            deadline = time.monotonic() + self.startup_timeout
            while not self.url:
                text = self.log_path.read_text()
                found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
                if found:
                    self.url = found.group(1)
                elif self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; its output:\n{text[-3000:]}")
                else:
                    time.sleep(0.05)
            wait_healthy(
                self.url,
                max(1.0, deadline - time.monotonic()),
                alive=lambda: self.proc.poll() is None,
            )
        except BaseException:
            self.stop()
            raise
        return self.url

    def output(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text() if self.log_path else ""

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s); safe to call twice."""
        atexit.unregister(self.stop)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __exit__(self, *exc) -> None:
        self.stop()
