"""What the engine benchmarks share: the result header, random prompts, engine set-up, a timed driver.

Every result file starts with the same header (`environment()`): device, jax version,
date and the command that made it, so a committed figure can be traced and rerun.

Presets (`--model llama-3.1-8b`) carry random weights at a real model's shape. Their
tokenizer is a synthetic word-level one with exactly the model's vocabulary
(`synthetic_tokenizer`): every token id decodes to a word, so each generated token is
text (streamed chunks and detokenization cost one token each), and no checkpoint or
tokenizer file has to be installed on the benchmark machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---- the result header ---------------------------------------------------------------


def command_line() -> str:
    """How this process was started, rerunnable from the repository root.

    Paths inside the repository are made relative to it; other absolute paths keep only
    their file name, so a result file names no machine's folders.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", _short_path(sys.argv[0])]
    return " ".join(head + [_short_path(a) for a in sys.argv[1:]])


def _short_path(arg: str) -> str:
    if not os.path.isabs(arg):
        return arg
    try:
        return os.path.relpath(arg, REPO) if Path(arg).resolve().is_relative_to(REPO) else os.path.basename(arg)
    except (OSError, ValueError):
        return os.path.basename(arg)


def environment(with_jax: bool = True) -> dict:
    """Device, versions, date and command. `with_jax=False` reads jax's version without importing it
    (an HTTP client must not take the GPU from the server it measures)."""
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
    }
    if with_jax:
        import jax

        dev = jax.devices()[0]
        env.update(device=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
                   jax_version=jax.__version__)
    else:
        from importlib.metadata import PackageNotFoundError, version

        try:
            env["jax_version"] = version("jax")
        except PackageNotFoundError:
            env["jax_version"] = None
    return env


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def stats_ms(values_s: list[float], percentiles=(50, 90, 99)) -> dict:
    """mean / median / std / pNN of durations given in seconds, in milliseconds."""
    if not values_s:
        return {"count": 0}
    ms = np.asarray(values_s, np.float64) * 1e3
    out = {"count": int(ms.size), "mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
           "min": float(ms.min()), "max": float(ms.max())}
    for p in percentiles:
        out[f"p{p}"] = float(np.percentile(ms, p))
    return out


# ---- prompts and tokenizer --------------------------------------------------------------


def random_prompts(n: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `input_len` token ids drawn uniformly from the vocabulary
    (vLLM's random dataset with a range ratio of 0: fixed lengths)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(n, input_len), dtype=np.int64).tolist()


def synthetic_tokenizer(vocab_size: int, folder: str | os.PathLike | None = None) -> str:
    """Write an HF tokenizer folder with the words "w0" .. "w{vocab_size-1}" as ids 0.. and return it.

    Decoding joins words with spaces, so every id adds text: a stream sends one chunk per
    token, as with a real vocabulary's ordinary tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder or tempfile.mkdtemp(prefix=f"synthetic-tokenizer-{vocab_size}-"))
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(folder / "tokenizer.json"))
    return str(folder)


# ---- the engine ------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's own flags (one per `EngineConfig` field, as `pagedjax serve` takes them)."""
    from server.cli import add_engine_args as add

    add(parser)


def engine_config(args: argparse.Namespace):
    """The `EngineConfig` of the parsed flags; a preset without --tokenizer gets the synthetic one."""
    from engine.source import PRESETS
    from server.cli import engine_config as config_of

    config = config_of(args)
    if config.model in PRESETS and config.tokenizer is None:
        config = config.replace(tokenizer=synthetic_tokenizer(PRESETS[config.model]().vocab_size))
    return config


def engine_flags(config) -> list[str]:
    """Command-line flags that rebuild `config` in another process (fields left at their default omitted)."""
    from engine.config import EngineConfig

    flags = []
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        flags += ["--" + f.name.replace("_", "-"), str(value)]
    return flags


def build_engine(config):
    from engine.engine import LLMEngine

    return LLMEngine(config, progress=False)


def engine_info(engine) -> dict:
    """What the engine ran with: its config, the model's shape, pages, buckets and start-up times."""
    mc = engine.model_config
    runner = engine.runner
    config = {k: _short_path(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(engine.config).items()}
    return {
        "config": config,
        "model": {"name": engine.model_name, "num_params": mc.num_params, "num_layers": mc.num_layers,
                  "hidden_size": mc.hidden_size, "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads,
                  "head_dim": mc.head_dim, "vocab_size": mc.vocab_size, "dtype": str(np.dtype(engine.dtype))},
        "attention_backend": getattr(engine.model, "attention_backend", None),
        "matmul_backend": getattr(engine.model, "matmul_backend", None),
        "max_model_len": engine.max_model_len,
        "num_pages": engine.scheduler.allocators[0].num_pages,  # of each data shard
        "page_size": engine.config.page_size,
        "token_buckets": list(runner.token_buckets),
        "page_buckets": list(runner.page_buckets),
        "num_step_graphs": len(runner.buckets()),
        "load_seconds": engine.load_seconds,
        "warmup_seconds": engine.warmup_seconds,
        "warmup_report": runner.warmup_report,
        "memory": device_memory(engine),
    }


def device_memory(engine) -> dict | None:
    """The first device's memory pool as the engine left it: limit, in use (weights + cache) and peak, GiB."""
    stats = engine.memory_stats()
    keys = ("bytes_limit", "bytes_in_use", "peak_bytes_in_use")
    return {k.replace("bytes", "gib"): stats[k] / (1 << 30) for k in keys if k in stats} if stats else None


# ---- the timed driver --------------------------------------------------------------------


@dataclass
class RequestTiming:
    """perf_counter() times of one request, as the driver loop saw them."""

    added: float
    first: float | None = None  # its first output token came back
    finish: float | None = None  # it finished
    num_output: int = 0


@dataclass
class Run:
    start: float
    end: float
    requests: dict[str, RequestTiming]
    steps: list[tuple[float, float, int]]  # (start, end, output tokens that step produced)
    num_preemptions: int
    peak_running: int  # the most sequences the scheduler ran at once

    @property
    def elapsed(self) -> float:
        return self.end - self.start


_request_ids = itertools.count()


def drive(engine, prompts: list[list[int]], params) -> Run:
    """Submit every prompt at once, step the engine until all finish, and time everything.

    Times are taken at the host, right after each `engine.step()` returns: what a caller of
    the offline API sees (the step's device work and the host's bookkeeping both count).
    """
    preempted_before = engine.scheduler.num_preemptions_total
    start = time.perf_counter()
    timings: dict[str, RequestTiming] = {}
    for p in prompts:
        rid = f"bench-{next(_request_ids)}"
        timings[rid] = RequestTiming(added=time.perf_counter())
        engine.add_request(rid, p, params)
    unfinished = set(timings)
    steps, peak = [], 0
    while unfinished:
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        peak = max(peak, engine.scheduler.num_running)
        produced = 0
        for out in outputs:
            t = timings.get(out.request_id)
            if t is None:
                continue
            n = out.num_generated_tokens
            if n > t.num_output:
                produced += n - t.num_output
                t.num_output = n
                if t.first is None:
                    t.first = t1
            if out.finished:
                t.finish = t1
                unfinished.discard(out.request_id)
        steps.append((t0, t1, produced))
    return Run(start, time.perf_counter(), timings, steps, engine.scheduler.num_preemptions_total - preempted_before,
               peak)


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None
