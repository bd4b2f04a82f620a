"""`pagedjax generate` as a user runs it: a subprocess, a preset model, text on stdout, errors on stderr."""

import os
import subprocess
import sys

SMALL = ["--max-model-len", "128", "--max-num-batched-tokens", "64", "--token-buckets", "16,64", "--page-buckets", "8"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "server.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_a_completion():
    out = run("--model", "tiny", *SMALL, "--max-tokens", "5", "--seed", "1", "--temperature", "0.8", "Hello")
    assert out.returncode == 0, out.stderr
    again = run("--model", "tiny", *SMALL, "--max-tokens", "5", "--seed", "1", "--temperature", "0.8", "Hello")
    assert out.stdout == again.stdout and out.stdout.strip()


def test_generate_reports_a_bad_model_clearly():
    out = run("--model", "no/such/folder", "Hello")
    assert out.returncode == 2
    assert "is neither an existing HF folder" in out.stderr and "tiny" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_command_gives_jax_95_percent_of_the_gpu_unless_the_environment_says(monkeypatch):
    """jax's own pool default is 75% of the GPU; `pagedjax` owns its device (server/cli.py)."""
    from server import cli

    env = {k: v for k, v in os.environ.items() if "MEM_FRACTION" not in k}
    monkeypatch.setattr(os, "environ", env)
    assert cli.main(["generate", "--model", "no/such/folder", "Hello"]) == 2
    assert env["XLA_CLIENT_MEM_FRACTION"] == "0.95"
    del env["XLA_CLIENT_MEM_FRACTION"]
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.5"  # the older name: setting both is an error in jax
    assert cli.main(["generate", "--model", "no/such/folder", "Hello"]) == 2
    assert "XLA_CLIENT_MEM_FRACTION" not in env and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
