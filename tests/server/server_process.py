"""Helpers for the server tests: start the real server (`python -m server.cli serve`) in a subprocess.

Each test file starts its server once (module-scoped fixtures). `--port 0` lets the server
pick a free port, which it prints in its ready line. Compiled executables go to a
persistent cache shared by every server the tests start, so only the first start of a
given model and shape compiles.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".jax_cache" / "server-tests"

# Small engine settings: two token buckets and one page bucket compile quickly.
TINY = ["--model", "tiny", "--max-model-len", "256", "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
        "--token-buckets", "16,64", "--page-buckets", "16"]

READY = re.compile(r"pagedjax: ready in .* at (http://\S+)/v1")


class ServerProcess:
    """One `pagedjax serve` subprocess; its output goes to a file, so a full pipe never blocks it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedjax-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--no-access-log",
               "--compilation-cache-dir", str(CACHE), *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
        self.url: str | None = None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 240) -> re.Match:
        """Wait until the server's output matches `pattern`; fail with the output if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def wait_ready(self, timeout: float = 240) -> str:
        self.url = self.wait_for(READY, timeout).group(1)
        return self.url

    def wait_listening(self, timeout: float = 60) -> str:
        """The URL, as soon as the socket is bound (before the model is ready)."""
        return self.wait_for(r"(http://\S+)/health answers 503", timeout).group(1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout} s:\n{self.output()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def start_server(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> ServerProcess:
    server = ServerProcess(*args, env=env)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The value of a series on /metrics, summed over its labels; `name` may end in a partial label set."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name)] in "{ ,"]
    assert values, f"{name} not on /metrics"
    return sum(values)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
