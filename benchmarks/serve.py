"""HTTP load against a running `pagedjax serve`, with the semantics and result keys of vLLM's `bench serve`.

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --num-prompts 200 --input-len 1024 \\
        --output-len 128 --request-rate inf --max-concurrency 64 --vocab-size 128256 --out serve.json

Dataset "random" with fixed lengths: each prompt is `--input-len` token ids drawn uniformly
from `[0, --vocab-size)`, sent as a list of ints in /v1/completions' `prompt`, asking for
exactly `--output-len` tokens (`max_tokens`, `ignore_eos`), streamed with
`stream_options.include_usage`.

`--launch "SERVER_ARGS"` starts the server itself (on a free local port), waits for it,
measures, and stops it.

Arrivals: request i+1 follows request i after a gamma-distributed gap with mean
1 / rate (shape `--burstiness`; 1 is a Poisson process); rate `inf` sends everything at
once. `--max-concurrency` caps the requests in flight. One untimed request goes first.

Per request, measured at the client as vLLM does: TTFT is the time to the first chunk
with choices; ITL the gaps between later chunks; E2EL the time to the last chunk with
choices; output tokens from the usage chunk; TPOT = (E2EL - TTFT) / (output - 1) for
requests with more than one token. Each is reported as mean / median / std / pNN in ms;
throughputs divide completed requests, output tokens, and input + output tokens by the
benchmark's duration. The keys are vLLM's (`request_throughput`, `mean_ttft_ms`,
`p99_itl_ms`, ...), so result files compare directly.

This client never imports jax, so it can share a machine with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from benchmarks.common import REPO, environment, random_prompts, write_json


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0  # seconds to the first chunk with choices
    latency: float = 0.0  # seconds to the last chunk with choices
    itl: list[float] = field(default_factory=list)  # gaps between later chunks
    output_tokens: int = 0  # from the usage chunk
    error: str = ""


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, prompt_len: int,
                       headers: dict | None = None) -> RequestResult:
    r = RequestResult(prompt_len)
    st = time.perf_counter()
    r.start_time = st
    most_recent = st
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {body[:500]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = json.dumps(chunk["error"])[:500]
                    return r
                now = time.perf_counter()
                if chunk.get("choices"):
                    if r.ttft == 0.0:
                        r.ttft = now - st
                    else:
                        r.itl.append(now - most_recent)
                    most_recent = now
                if chunk.get("usage"):
                    r.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        r.latency = most_recent - st
        r.success = r.ttft > 0.0
        if not r.success:
            r.error = "the stream ended without any choices"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"[:500]
    return r


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait after each request before the next: gamma(shape=burstiness, mean=1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n).tolist()


def _stats(prefix: str, values_s: list[float], percentiles: list[float]) -> dict:
    ms = np.asarray(values_s or [0.0], np.float64) * 1e3
    out = {f"mean_{prefix}_ms": float(ms.mean()), f"median_{prefix}_ms": float(np.median(ms)),
           f"std_{prefix}_ms": float(ms.std())}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{prefix}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict:
    """vLLM's aggregates over the successful requests."""
    ok = [r for r in results if r.success]
    output_lens = [r.output_tokens or len(r.itl) + 1 for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(output_lens)
    tpots = [(r.latency - r.ttft) / (n - 1) for r, n in zip(ok, output_lens) if n > 1]
    metrics = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        **_peaks(ok),
    }
    metrics |= _stats("ttft", [r.ttft for r in ok], percentiles)
    metrics |= _stats("tpot", tpots, percentiles)
    metrics |= _stats("itl", [g for r in ok for g in r.itl], percentiles)
    metrics |= _stats("e2el", [r.latency for r in ok], percentiles)
    return metrics


def _peaks(ok: list[RequestResult]) -> dict:
    """Most output tokens in any one-second window, and most requests in flight at once."""
    if not ok:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    t0 = min(r.start_time for r in ok)
    token_times = []
    for r in ok:
        t = r.start_time + r.ttft
        token_times.append(t)
        for g in r.itl:
            t += g
            token_times.append(t)
    per_second = np.bincount(((np.asarray(token_times) - t0)).astype(np.int64))
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    return {"max_output_tokens_per_s": float(per_second.max()), "max_concurrent_requests": peak}


async def wait_ready(base_url: str, timeout: float, server: subprocess.Popen | None = None) -> None:
    """Poll /health until it answers 200 (the server compiles before it does)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                if (await client.get(f"{base_url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}) before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout:g} s")
            await asyncio.sleep(0.5)


def launch_server(server_args: str, log_path: str | None) -> tuple[subprocess.Popen, str]:
    """`python -m server.cli serve ARGS` on a free local port; returns the process and its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--no-access-log", *shlex.split(server_args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def benchmark(args, server: subprocess.Popen | None = None) -> dict:
    base = args.base_url.rstrip("/")
    if args.wait_ready:
        t0 = time.perf_counter()
        await wait_ready(base, args.wait_ready, server)
        print(f"server ready after {time.perf_counter() - t0:.1f} s", flush=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        model = args.model
        if model is None:
            resp = await client.get(f"{base}/v1/models", headers=headers)
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        url = f"{base}/v1/completions"
        prompts = random_prompts(args.num_prompts + 1 + args.num_warmups, args.input_len, args.vocab_size, args.seed)

        def payload(prompt):
            return {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": args.temperature,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}

        test = await send_request(client, url, payload(prompts[0]), args.input_len, headers)
        if not test.success:
            raise RuntimeError(f"the initial test request failed: {test.error}")
        await asyncio.gather(*(send_request(client, url, payload(p), args.input_len, headers)
                               for p in prompts[1:1 + args.num_warmups]))
        prompts = prompts[1 + args.num_warmups:]

        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(prompt):
            if sem is None:
                return await send_request(client, url, payload(prompt), args.input_len, headers)
            async with sem:
                return await send_request(client, url, payload(prompt), args.input_len, headers)

        gaps = arrival_gaps(len(prompts), args.request_rate, args.burstiness, args.seed)
        start = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            tasks.append(asyncio.create_task(limited(prompt)))
            if gap > 0:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    metrics = compute_metrics(results, duration, percentiles)
    errors = sorted({r.error for r in results if r.error})
    out = {
        "backend": "pagedjax", "model_id": model, "tokenizer_id": None, "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, **metrics,
        "errors_sample": errors[:5],
    }
    if args.save_detailed:
        out |= {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
                "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
                "start_times": [r.start_time - start for r in results], "errors": [r.error for r in results]}
    return out


def _roofline(args, model: str, concurrency: int) -> dict | None:
    """The offline floor of the same requests at the same concurrency, when the model is a preset."""
    if not args.ceilings:
        return None
    from benchmarks import roofline
    from engine.source import PRESETS

    preset = args.preset or model
    if preset not in PRESETS:
        return None
    ceilings = roofline.load_or_measure(args.ceilings)
    floor = roofline.offline_floor(PRESETS[preset](), 2, args.num_prompts, args.input_len, args.output_len,
                                   concurrency, ceilings)
    return {"ceilings": ceilings, "offline_at_same_concurrency": floor}


def print_summary(r: dict) -> None:
    print("============ Serving Benchmark Result ============")
    rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
            ("Benchmark duration (s)", r["duration"]), ("Total input tokens", r["total_input_tokens"]),
            ("Total generated tokens", r["total_output_tokens"]),
            ("Request throughput (req/s)", r["request_throughput"]),
            ("Output token throughput (tok/s)", r["output_throughput"]),
            ("Total token throughput (tok/s)", r["total_token_throughput"])]
    for name in ("ttft", "tpot", "itl", "e2el"):
        rows += [(f"{stat.capitalize()} {name.upper()} (ms)", r[f"{stat}_{name}_ms"]) for stat in ("mean", "median")]
        rows += [(f"{k[:k.index('_')].upper()} {name.upper()} (ms)", v) for k, v in r.items()
                 if k.startswith("p") and k.endswith(f"_{name}_ms")]
    for name, value in rows:
        print(f"{name + ':':<40} {value:<10.2f}" if isinstance(value, float) else f"{name + ':':<40} {value}")
    print("=" * 50, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt ids are drawn from [0, this); must not exceed the model's vocabulary")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-warmups", type=int, default=0, help="untimed requests after the initial test request")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=3600.0)
    p.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for /health to answer 200 first")
    p.add_argument("--save-detailed", action="store_true", help="also write per-request lists")
    p.add_argument("--device", help="the server's device, for the result header (this client does not look)")
    p.add_argument("--preset", help="the preset the server runs, for the roofline (default: the model name)")
    p.add_argument("--ceilings", help="a benchmarks.roofline JSON of this run, for the floor")
    p.add_argument("--launch", metavar="SERVER_ARGS",
                   help="start `python -m server.cli serve SERVER_ARGS` on a free local port, measure it, stop it")
    p.add_argument("--server-log", help="file for the launched server's output")
    p.add_argument("--out", help="where to write the JSON result")
    args = p.parse_args()
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")

    env = environment(with_jax=False)
    server = None
    if args.launch:
        server, args.base_url = launch_server(args.launch, args.server_log)
        args.wait_ready = args.wait_ready or 900.0
    try:
        result = asyncio.run(benchmark(args, server))
    finally:
        if server is not None:
            stop_server(server)
    print_summary(result)
    if args.out:
        concurrency = min(args.max_concurrency or args.num_prompts, args.num_prompts)
        metric_keys = [k for k in result if k not in ("backend", "model_id", "tokenizer_id", "errors_sample")
                       and not isinstance(result[k], list)]
        write_json(args.out, {
            **env, "device": args.device, "kind": "serve", "model": result["model_id"],
            "workload": f"{args.num_prompts} prompts x {args.input_len} in x {args.output_len} out, request rate "
                        f"{result['request_rate']}, max concurrency {args.max_concurrency}",
            **result, "metrics": {k: result[k] for k in metric_keys}, "peer": None,
            "roofline": _roofline(args, result["model_id"], concurrency),
        })


if __name__ == "__main__":
    main()
