"""Engine configuration: one frozen dataclass that checks itself.

TOML presets in `configs/` and CLI flags only fill these fields; a bad value fails at
start-up with a message naming the field.
"""

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


class EngineConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, or preset name (random weights); None: the default SmolLM2
    tokenizer: str | None = None  # defaults to the model's own (for presets: the default model's)
    dtype: str = "auto"  # "float32", "bfloat16", or "auto" (bfloat16 on accelerators, float32 on CPU)
    seed: int = 0  # seed of random weights (presets) and of unseeded requests' streams
    max_model_len: int | None = None  # prompt + output limit; None: min(model's, 4096)
    page_size: int = 16  # tokens per KV-cache page
    num_pages: int | None = None  # KV-cache pages (of each data shard); None: sized from free device memory
    # share of the device's memory pool that weights and KV cache may fill; the rest is the steps'
    # scratch. The pool is jax's: XLA_CLIENT_MEM_FRACTION of the GPU, 0.95 under `pagedjax`, else 0.75.
    memory_utilization: float = 0.9
    max_num_seqs: int = 64  # sequences in one step (of each data shard)
    max_num_batched_tokens: int = 512  # tokens in one step, per data shard (chunked prefill splits longer prompts)
    token_buckets: tuple[int, ...] | None = None  # padded step sizes; None: 4, 16, 64, ... up to the budget
    page_buckets: tuple[int, ...] | None = None  # padded block-table widths; None: max, max/4, max/16
    compilation_cache_dir: str | None = None  # jax's persistent compilation cache (fast restarts)
    tp: int = 1  # tensor parallelism (model axis of the mesh)
    dp: int = 1  # data parallelism (data axis of the mesh)
    coordinator_address: str | None = None  # multi-host: host:port of process 0, the same on every process
    num_processes: int = 1  # multi-host: processes in the run (each runs `pagedjax serve` with its own process_id)
    process_id: int = 0  # multi-host: this process; 0 runs the server and the scheduler
    attention_backend: str | None = None  # None: the best one for the platform
    # the layers' projections: "xla", or "pallas" (fused kernels for small steps, GPU; an experiment,
    # slower than XLA on an H100: benchmarks/NOTES-matmul.md)
    matmul_backend: str = "xla"
    decode_steps: int | None = None  # decode steps fused into one call when nothing waits; None: 8 on accelerators, 1 on CPU

    def __post_init__(self):
        def bad(name, why):
            raise EngineConfigError(f"engine config: {name} {why} (got {getattr(self, name)!r})")

        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad("dtype", "must be 'auto', 'float32' or 'bfloat16'")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            bad("page_size", "must be a power of two")
        if self.num_pages is not None and self.num_pages < 2:
            bad("num_pages", "must be at least 2 (page 0 is reserved)")
        if not 0 < self.memory_utilization <= 1:
            bad("memory_utilization", "must be in (0, 1]")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            bad("max_num_batched_tokens", f"must be >= max_num_seqs ({self.max_num_seqs})")
        if self.max_model_len is not None and self.max_model_len < 1:
            bad("max_model_len", "must be >= 1")
        if self.decode_steps is not None and self.decode_steps < 1:
            bad("decode_steps", "must be >= 1")
        if self.matmul_backend not in ("xla", "pallas"):
            bad("matmul_backend", "must be 'xla' or 'pallas'")
        if self.tp < 1 or self.dp < 1:
            bad("tp" if self.tp < 1 else "dp", "must be >= 1")
        if self.num_processes < 1:
            bad("num_processes", "must be >= 1")
        if not 0 <= self.process_id < self.num_processes:
            bad("process_id", f"must be in 0..{self.num_processes - 1} (num_processes={self.num_processes})")
        if self.num_processes > 1 and not self.coordinator_address:
            bad("coordinator_address", f"is needed with num_processes={self.num_processes} (host:port of process 0)")
        if self.token_buckets is not None and max(self.token_buckets) < self.max_num_batched_tokens:
            bad("token_buckets", f"must reach max_num_batched_tokens ({self.max_num_batched_tokens})")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_toml(cls, path: str | Path, **override) -> "EngineConfig":
        """Fill from a TOML file's top-level keys (names as the fields), then apply overrides."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise EngineConfigError(f"cannot read engine config {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EngineConfigError(f"{path}: unknown engine config keys {unknown}; known: {sorted(known)}")
        for key in ("token_buckets", "page_buckets"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**{**data, **{k: v for k, v in override.items() if v is not None}})
