"""`pagedjax generate` as a user runs it: a subprocess, a preset model, text on stdout, errors on stderr."""

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
