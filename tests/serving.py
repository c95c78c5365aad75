"""Start and stop a real `rewardscope serve` (BentoML) on a free 127.0.0.1 port for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
# The bearer token of the session's shared server (conftest's `token_server`).
TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving_process(
    command: list[str], port: int, env: dict[str, str], probe: str, name: str, timeout: float = 180
) -> Iterator[str]:
    """Start `command` (a server listening on 127.0.0.1:port) in its own session, wait until GET probe answers 200,
    yield the base URL, then stop it (SIGTERM: the service drains; SIGKILL after 40 s) and any worker left. The
    server's log is kept (its path in /tmp) only when something failed."""
    log = tempfile.NamedTemporaryFile(prefix=f"rewardscope-{name}-", suffix=".log", delete=False)
    failed = True
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + probe, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not up after {timeout}s:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield base_url
        failed = False
    finally:
        # BentoML's workers run in sessions of their own: collected now, so none outlives the test.
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        log.close()
        if not failed:
            Path(log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def running_server(
    env: dict[str, str] | None = None, ready: bool = True, timeout: float = 180, port: int | None = None
) -> Iterator[str]:
    """Yield the base URL of a served RewardService; ready=False waits only for /livez (not-ready tests). port: a
    fixed one (a service restarted where it was, tests/test_client_outage.py); None: a free one."""
    port = free_port() if port is None else port
    # Each server its own BentoML home: two servers sharing one clash on the task store's sqlite file. Removed with
    # the server: CI runs on a clean clone, and left behind, these pile up on its disk.
    with tempfile.TemporaryDirectory(prefix="bentoml-home-", ignore_cleanup_errors=True) as home:
        environment = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": home, **(env or {})}
        command = [
            sys.executable,
            "-m",
            "rewardscope.service.tools.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with serving_process(command, port, environment, "/readyz" if ready else "/livez", "server", timeout) as url:
            yield url


def server_process(base_url: str) -> psutil.Process:
    """The `rewardscope serve` process behind base_url: a child of this process (running_server starts it)."""
    port = base_url.rsplit(":", 1)[1]
    for child in psutil.Process().children():
        command = child.cmdline()
        if "--port" in command and command[command.index("--port") + 1 : command.index("--port") + 2] == [port]:
            return child
    raise RuntimeError(f"no child process serves port {port}")


def server_tree(base_url: str) -> list[psutil.Process]:
    """The server process and all its descendants (BentoML's workers): a crashed worker comes back with a new PID."""
    root = server_process(base_url)
    return [root, *root.children(recursive=True)]
