"""Two processes on one machine, one CPU device each, joined through jax.distributed (gloo over loopback).

Process 0 runs the workload through an engine at tp=2, whose model axis spans both
processes; process 1 is a plain `pagedjax generate` command line with
--process-id 1, which only executes process 0's steps. The tokens must be those of
one process on one device.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_workload import SMALL, run_workload

from engine.config import EngineConfig
from engine.engine import LLMEngine
from models.default import default_model_path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _flags(settings: dict) -> list[str]:
    flags = ["--model", "tiny", "--tokenizer", str(default_model_path()), "--dtype", "float32", "--tp", "2",
             "--num-processes", "2"]
    for name, value in settings.items():
        flags += ["--" + name.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# "sized": no --num-pages, so each process sizes the cache from its device and all take the fewest pages
@pytest.mark.parametrize("pages", ["given", "sized"])
def test_tp2_across_two_processes_matches_one(tmp_path, pages):
    settings = SMALL if pages == "given" else {k: v for k, v in SMALL.items() if k != "num_pages"}
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "tokens.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "multihost_lead.py"), address, str(out), *_flags(settings)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([sys.executable, "-m", "server.cli", "generate", *_flags(settings),
                          "--coordinator-address", address,
                          "--process-id", "1", "unused: process 1 runs process 0's steps"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    # Meanwhile, the same workload on one device in this process.
    one = run_workload(LLMEngine(EngineConfig(model="tiny", tokenizer=str(default_model_path()), dtype="float32",
                                              **settings), progress=False))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert json.loads(out.read_text()) == one
