"""The deployment's pieces as real processes on free loopback ports, started by the test itself.

* :func:`redis_server` — ``redis-server`` without persistence; yields its URL (``redis://127.0.0.1:P/0``).
* :func:`server_process` — ``python -m server`` as a subprocess; yields a :class:`ServerProcess` that the
  test can :meth:`~ServerProcess.kill` (SIGKILL) or :meth:`~ServerProcess.terminate` (SIGTERM).
* :func:`haproxy` — ``haproxy`` on the shipped ``deploy/haproxy.cfg``, its replicas given as the
  ``FM_REPLICA_<n>`` variables the file reads; yields a :class:`Proxy` that reports what state
  HAProxy holds each replica in.

Each waits until its process answers (PING, ``GET /health``, a listening port) by polling with a
timeout, fails with the process's own output when it exits or never answers, and stops it on exit.
The Debian packages ``redis-server`` and ``haproxy`` come from ``make test-deps``.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
BACKEND = "replicas"  # the backend section of haproxy.cfg
POLL_SECONDS = 0.05


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick; free until someone else binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def program(name: str) -> str:
    """The path of ``name`` (also looked for in /usr/sbin, where Debian puts daemons), or a failure that
    says how to install it."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test-deps` (it installs the Debian package)")
    return found


def tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def wait_for_process(ready: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str,
                     log: Path) -> None:
    """Polls ``ready`` until it is true; fails if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it answered:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:g} s:\n{tail(log)}")
        time.sleep(POLL_SECONDS)


def stop(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` on 127.0.0.1:port; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def answers_health(port: int) -> bool:
    try:
        return http_get(port, "/health")[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def log_folder(log_dir: Path | None, prefix: str) -> Iterator[Path]:
    """``log_dir`` (kept), or a temporary folder removed on exit."""
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=prefix, dir=log_dir))
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield Path(folder)


def without_fm_settings(env: dict[str, str] | None) -> dict[str, str]:
    """This environment without the caller's FM_* settings (they would change the process), plus ``env``."""
    result = {k: v for k, v in os.environ.items() if not k.startswith("FM_")}
    result.update(env or {})
    return result


# ----------------------------------------------------------------------------- Redis

def redis_answers(port: int) -> bool:
    """Whether a Redis server on 127.0.0.1:port answers PING (through the ``redis`` package when it is
    installed, else on a raw socket)."""
    try:
        import redis
    except ImportError:
        return _raw_ping(port)
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0).ping())
    except redis.RedisError:
        return False


def _raw_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(timeout: float = 30.0, log_dir: Path | None = None) -> Iterator[str]:
    """``redis-server`` on a free loopback port, nothing saved to disk; yields ``redis://127.0.0.1:P/0``."""
    binary = program("redis-server")
    with log_folder(log_dir, "redis-") as folder:
        port = free_port()
        log = folder / "redis.log"
        with log.open("wb") as out:
            process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--dir", str(folder)],
                                       stdout=out, stderr=subprocess.STDOUT, cwd=folder)
        try:
            wait_for_process(lambda: redis_answers(port), process, timeout, f"redis-server on port {port}", log)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop(process)


# ----------------------------------------------------------------------------- FM Server

class LoopbackProcess:
    """A process serving HTTP and WebSockets on a loopback port, logging to a file."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        """What it wrote to stdout and stderr so far (the end of it)."""
        return tail(self.log_path)


class ServerProcess(LoopbackProcess):
    """A running ``python -m server``: its port, pid and URLs, and ways to end it."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:P``, as a proxy's backend list takes it."""
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Polls ``GET /health`` until it answers 200; fails with the server's output if it exits first."""
        wait_for_process(lambda: answers_health(self.port), self.process, timeout,
                         f"python -m server on port {self.port}", self.log_path)

    def kill(self) -> int:
        """SIGKILL: the server vanishes without saving anything. Returns the exit code."""
        self.process.kill()
        return self.process.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit (uvicorn's graceful shutdown); returns the exit code (uvicorn
        re-raises the signal after it has shut down, so a clean exit reads -15). Fails if it takes longer
        than ``timeout``."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"python -m server did not exit within {timeout:g} s of SIGTERM:\n{self.log()}")


@contextlib.contextmanager
def server_process(args: list[str] | None = None, env: dict[str, str] | None = None, *, wait: bool = True,
                   timeout: float = 120.0, log_dir: Path | None = None, port: int | None = None
                   ) -> Iterator[ServerProcess]:
    """``python -m server ARGS --host 127.0.0.1 --port P`` on ``port`` (default a free one; the harness's host
    and port win).

    The caller's FM_* variables are left out of its environment; ``env`` is added. With ``wait`` (the
    default) it returns once ``GET /health`` answers 200; without, the caller calls
    :meth:`ServerProcess.wait_healthy`, so that several servers can load their models at once. Its
    stdout and stderr go to ``server.log`` in ``log_dir`` (or a temporary folder). On exit a server still
    running gets SIGTERM (SIGKILL after 15 s).
    """
    with log_folder(log_dir, "fm-server-") as folder:
        port = port or free_port()
        log = folder / "server.log"
        command = [sys.executable, "-m", "server", *(args or []), "--host", "127.0.0.1", "--port", str(port)]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=without_fm_settings(env))
        server = ServerProcess(process, port, log)
        try:
            if wait:
                server.wait_healthy(timeout)
            yield server
        finally:
            stop(process)


# ----------------------------------------------------------------------------- HAProxy

def replica_slots(cfg: Path = HAPROXY_CFG) -> int:
    """How many ``FM_REPLICA_<n>`` slots haproxy.cfg has."""
    return len(set(re.findall(r"\bFM_REPLICA_(\d+)\b", cfg.read_text())))


class Proxy(LoopbackProcess):
    """A running HAProxy: its port, and how it sees each replica (from its stats page)."""

    def __init__(self, process: subprocess.Popen, port: int, stats_port: int, backends: list[str],
                 log: Path) -> None:
        super().__init__(process, port, log)
        self.stats_port = stats_port
        self.backends = backends

    def states(self) -> dict[str, str]:
        """Each backend address as given -> HAProxy's status for it: "UP", "DOWN", "UP 1/2" (going
        down), "DOWN 1/2" (coming up), "MAINT" (e.g. a name that does not resolve), ..."""
        status, body = http_get(self.stats_port, "/stats;csv")
        if status != 200:
            raise RuntimeError(f"the stats page answered {status}")
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        by_slot = {f"replica-{i}": backend for i, backend in enumerate(self.backends, start=1)}
        return {by_slot[row["svname"]]: row["status"] for row in rows
                if row["pxname"] == BACKEND and row["svname"] in by_slot}

    def up(self) -> list[str]:
        """The backends HAProxy sends new connections to."""
        return [backend for backend, status in self.states().items() if status.startswith("UP")]

    def healthy(self) -> bool:
        """The proxy's own /health: 200 while at least one replica is up."""
        try:
            return http_get(self.stats_port, "/health")[0] == 200
        except OSError:
            return False


@contextlib.contextmanager
def haproxy(backends: list[str], timeout: float = 30.0, cfg: Path = HAPROXY_CFG,
            env: dict[str, str] | None = None, log_dir: Path | None = None) -> Iterator[Proxy]:
    """``haproxy -f deploy/haproxy.cfg`` in front of ``backends`` (``host:port`` each, FM_REPLICA_1...),
    listening on a free loopback port, its stats page on another; yields a :class:`Proxy` once both
    listen. Replicas are health-checked from then on: wait for :meth:`Proxy.up` before counting on one.
    ``env`` adds or overrides variables the file reads."""
    binary = program("haproxy")
    slots = replica_slots(cfg)
    if not 1 <= len(backends) <= slots:
        raise ValueError(f"{cfg.name} takes 1 to {slots} replicas, not {len(backends)}")
    with log_folder(log_dir, "haproxy-") as folder:
        port, stats_port = free_port(), free_port()
        variables = {k: v for k, v in os.environ.items() if not k.startswith("FM_")}
        variables.update({f"FM_REPLICA_{i}": backend for i, backend in enumerate(backends, start=1)})
        variables.update(FM_PROXY_BIND=f"127.0.0.1:{port}", FM_STATS_BIND=f"127.0.0.1:{stats_port}")
        variables.update(env or {})
        log = folder / "haproxy.log"
        with log.open("wb") as out:
            process = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                       cwd=folder, env=variables)
        try:
            wait_for_process(lambda: listening(port) and listening(stats_port), process, timeout,
                             f"haproxy on port {port}", log)
            yield Proxy(process, port, stats_port, list(backends), log)
        finally:
            stop(process)
