"""Start a real `expertmesh serve` process on a free 127.0.0.1 port and wait (bounded) until
/health answers; stop it with SIGTERM (then SIGKILL) so no test leaves a server behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: object = None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 30.0) -> tuple[int, dict, object]:
    """(status, headers, parsed JSON or text) without raising on error statuses."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, payload = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(payload)
    except ValueError:
        return status, hdrs, payload.decode()


class ServerProcess:
    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")
        cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.engine_pid = self._wait_ready()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            match = re.search(r"engine pid (\d+)", self.log())
            if match:
                try:
                    if http("GET", self.url + "/health", timeout=2)[0] == 200:
                        return int(match.group(1))
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not healthy within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # never leave an engine process behind, whatever happened to the frontend
            os.kill(self.engine_pid, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        self._log.close()
        return self.proc.returncode


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0.0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        base, _, label_str = head.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in label_str for k, v in labels.items()):
            return float(value)
    return 0.0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
