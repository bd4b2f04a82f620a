"""The benchmark harness end to end on the CPU, at toy sizes on the tiny preset.

Speed is not checked here (speed claims live in the committed results); what is checked
is that every script runs, counts what it says it counts, and writes the keys that
`benchmarks/summarize.py`, the summary and vLLM-style comparisons rely on. The floors are
checked against bytes and FLOPs counted by hand for the Llama-3.1-8B shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks import roofline, serve, throughput
from benchmarks.common import synthetic_tokenizer
from engine.source import PRESETS

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".jax_cache" / "benchmark-tests"  # compiled steps persist between test runs
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
# Two token buckets and one page bucket: a few graphs, compiled once and then read from CACHE.
ENGINE = ["--model", "tiny", "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
          "--token-buckets", "16,64", "--page-buckets", "16", "--compilation-cache-dir", str(CACHE)]
CEILINGS = {"copy_TBps": 0.01, "matmul_TFLOPs": 0.1}
HEADER = ("device", "jax_version", "command", "workload", "metrics", "peer", "roofline")


def run_module(module: str, *args: str, timeout: float = 300) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(autouse=True, scope="module")
def cpu_children():
    """Processes the harness starts itself (warm-up probe, server) inherit the environment: keep them on the CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_PLATFORMS", "cpu")
        yield


@pytest.fixture(scope="module")
def ceilings_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("roofline") / "roofline.json"
    path.write_text(json.dumps({"ceilings": CEILINGS}))
    return str(path)


# ---- floors -----------------------------------------------------------------------------


def test_floors_of_llama3_8b_match_a_hand_count():
    cfg = PRESETS["llama-3.1-8b"]()
    e, f, layers, vocab = 4096, 14336, 32, 128256
    per_layer = e * 4096 * 2 + e * 1024 * 2 + 3 * e * f + 2 * e  # q, o; k, v; gate, up, down; two norms
    params = layers * per_layer + 2 * vocab * e + e  # untied embedding and LM head, final norm
    assert cfg.num_params == params
    # A decode step reads every weight but the embedding table (only its rows are gathered).
    assert roofline.weight_bytes(cfg, 2) == (params - vocab * e) * 2
    assert roofline.kv_bytes_per_token(cfg, 2) == 2 * layers * 8 * 128 * 2
    t = 1024
    flops = 2 * layers * (per_layer - 2 * e) * t + 2 * vocab * e + 4 * layers * 32 * 128 * t * (t + 1) // 2
    floor = roofline.prefill_floor(cfg, 2, t, 1, {"copy_TBps": 3.0, "matmul_TFLOPs": 700.0})
    assert floor["flops"] == flops
    assert floor["floor_ms"] == pytest.approx(flops / 700e12 * 1e3, rel=1e-3)
    assert floor["bound"] == "compute"
    step = roofline.decode_step_floor(cfg, 2, [256], {"copy_TBps": 3.0, "matmul_TFLOPs": 700.0})
    assert step["bound"] == "memory"
    assert step["floor_ms"] == pytest.approx(((params - vocab * e) * 2 + 256 * 131072) / 3e12 * 1e3)


def test_offline_floor_counts_waves():
    cfg = PRESETS["tiny"]()
    c = {"copy_TBps": 1.0, "matmul_TFLOPs": 10.0}
    one = roofline.offline_floor(cfg, 4, 8, 32, 16, 8, c)["floor_s"]
    assert roofline.offline_floor(cfg, 4, 24, 32, 16, 8, c)["floor_s"] == pytest.approx(3 * one)


def test_num_prompts_fit_the_budget():
    # A probe at 10 rows: 20 ms a step, of which the weights are half (1e9 bytes fixed, 1e8 per row).
    p = {"concurrency": 100, "prefill_tok_s": 1e6, "rows": 10, "decode_step_ms_at_rows": 20.0,
         "step_bytes_fixed": 1e9, "step_bytes_per_row": 1e8}
    assert throughput.decode_step_ms(p, 100) == pytest.approx(20.0 * 11e9 / 2e9)  # 110 ms at 100 rows
    wave = throughput.estimate_seconds(100, 1000, 101, p)
    assert wave == pytest.approx(1.15 * (0.1 + 100 * 0.11))
    assert throughput.estimate_seconds(250, 1000, 101, p) == pytest.approx(1.15 * (0.25 + 3 * 100 * 0.11))
    assert throughput.choose_num_prompts(1000, 1000, 101, p, budget_s=1e9) == 1000
    assert throughput.choose_num_prompts(1000, 1000, 101, p, budget_s=3.5 * wave) == 300  # whole waves
    # Less than a wave: the most prompts of one wave that fit (fewer rows make each step cheaper).
    n = throughput.choose_num_prompts(1000, 1000, 101, p, budget_s=0.5 * wave)
    assert 0 < n < 100
    assert throughput.estimate_seconds(n, 1000, 101, p) <= 0.5 * wave < throughput.estimate_seconds(n + 1, 1000, 101, p)
    assert throughput.choose_num_prompts(1000, 1000, 101, p, budget_s=0.01) == 0  # not even one request


# ---- the serve client's arithmetic --------------------------------------------------------


def test_serve_metrics_follow_vllm_definitions():
    r1 = serve.RequestResult(prompt_len=10, success=True, start_time=0.0, ttft=0.1, latency=0.5,
                             itl=[0.1, 0.1, 0.1, 0.1], output_tokens=5)
    r2 = serve.RequestResult(prompt_len=10, success=True, start_time=0.2, ttft=0.3, latency=0.3, itl=[],
                             output_tokens=1)
    r3 = serve.RequestResult(prompt_len=10, error="HTTP 429")
    m = serve.compute_metrics([r1, r2, r3], duration=2.0, percentiles=[99])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 13.0
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1); one-token requests have no TPOT
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_e2el_ms"] == pytest.approx(400.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["max_concurrent_requests"] == 2
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert {f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", f"p99_{name}_ms"} <= m.keys()


def test_poisson_arrivals_have_the_asked_rate():
    gaps = serve.arrival_gaps(20000, rate=50.0, burstiness=1.0, seed=0)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert serve.arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


# ---- the scripts, end to end --------------------------------------------------------------


def test_latency_cli(tmp_path, ceilings_file):
    """Through `pagedjax bench latency`, which runs `python -m benchmarks.latency` with the same flags."""
    out = tmp_path / "latency.json"
    run_module("server.cli", "bench", "latency", *ENGINE, "--case", "1x16x8", "--case", "3x24x4",
               "--ttft-input-len", "40", "--repeats", "2", "--ttft-repeats", "2", "--ceilings", ceilings_file,
               "--out", str(out))
    r = json.loads(out.read_text())
    assert all(k in r for k in HEADER) and r["device"] == "cpu" and r["kind"] == "latency"
    assert r["command"].startswith("python -m benchmarks.latency --model tiny")
    b1, b3 = r["metrics"]["cases"]
    assert (b1["batch"], b1["input_len"], b1["output_len"], b1["repeats"]) == (1, 16, 8, 2)
    assert b1["decode_step_ms"] > 0 and b1["decode_tok_s"] == pytest.approx(1e3 / b1["decode_step_ms"])
    assert b1["decode_steps_timed"] == 2 * 7  # every step after the first token, in each repeat
    assert b3["batch"] == 3 and b3["decode_tok_s"] == pytest.approx(3e3 / b3["decode_step_ms"])
    assert r["metrics"]["ttft"]["input_len"] == 40 and r["metrics"]["ttft"]["ttft_ms"] > 0
    assert r["roofline"]["ceilings"] == CEILINGS and r["roofline"]["ttft"]["floor_ms"] > 0
    assert r["engine"]["num_step_graphs"] == 2 and r["engine"]["attention_backend"]


def test_bench_without_its_extra_says_what_to_install(monkeypatch, capsys):
    from server import cli

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the command sets jax's pool fraction in it
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if `pagedjax[bench]` were not installed
    monkeypatch.delitem(sys.modules, "benchmarks.serve")  # run afresh, as in a new process
    assert cli.main(["bench", "serve", "--help"]) == 2
    assert "needs httpx: pip install 'pagedjax[bench]'" in capsys.readouterr().err


def test_throughput_cli_fits_the_budget(tmp_path, ceilings_file):
    out = tmp_path / "throughput.json"
    run_module("benchmarks.throughput", *ENGINE, "--num-prompts", "12", "--input-len", "20", "--output-len", "6",
               "--max-seconds", "600", "--ceilings", ceilings_file, "--out", str(out))
    r = json.loads(out.read_text())
    assert all(k in r for k in HEADER) and r["kind"] == "throughput"
    m = r["metrics"]
    assert (m["num_requests"], m["total_input_tokens"], m["total_output_tokens"]) == (12, 240, 72)
    assert m["tokens_per_second"] == pytest.approx(312 / m["elapsed_time"])
    assert m["output_tokens_per_second"] == pytest.approx(72 / m["elapsed_time"])
    assert m["requested_num_prompts"] == 12 and m["concurrency"] == m["peak_running"] == 8
    assert m["probe"]["concurrency"] == 8 and m["probe"]["rows"] >= 1 and m["estimate_s"] > 0
    assert r["roofline"]["offline"]["output_tok_s"] > 0 and r["roofline"]["offline"]["concurrency"] == 8
    assert r["workload"] == "12 prompts x 20 in x 6 out, offline"
    kinds = m["step_kinds"]  # every engine step is counted once; on the CPU none is fused
    assert sum(k["count"] for k in kinds.values()) == m["num_steps"]
    assert kinds["single_with_prompt_tokens"]["count"] >= 2 and kinds["single_decode_only"]["count"] >= 5
    assert kinds["fused"]["count"] == 0
    assert sum(k["queued_ahead"] for k in kinds.values()) == m["num_steps"] - 1  # all but the first


def test_warmup_probe_times_a_cold_and_a_cached_start(tmp_path):
    from engine.config import EngineConfig

    vocab = PRESETS["tiny"]().vocab_size
    config = EngineConfig(model="tiny", tokenizer=synthetic_tokenizer(vocab, tmp_path / "tokenizer"),
                          max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(16, 64),
                          page_buckets=(16,))
    w = throughput.warmup_probe(config, str(tmp_path / "cache"))
    assert [run["label"] for run in w["runs"]] == ["cold", "cached"]
    assert [run["compilation_cache_empty_at_start"] for run in w["runs"]] == [True, False]
    assert w["warmup_cold_s"] > w["warmup_cached_s"] > 0
    assert any((tmp_path / "cache").iterdir())


def test_serve_client_against_a_real_server(tmp_path):
    vocab = PRESETS["tiny"]().vocab_size
    tok = synthetic_tokenizer(vocab, tmp_path / "tokenizer")
    server_args = " ".join(ENGINE + ["--tokenizer", tok])
    proc, url = serve.launch_server(server_args, str(tmp_path / "server.log"))
    args = Namespace(base_url=url, wait_ready=240.0, api_key=None, max_concurrency=3, request_timeout=120.0,
                     model=None, num_prompts=7, num_warmups=1, input_len=12, output_len=5, vocab_size=vocab, seed=0,
                     temperature=0.0, request_rate=50.0, burstiness=1.0, metric_percentiles="50,99",
                     save_detailed=True)
    try:
        r = asyncio.run(serve.benchmark(args, proc))
    except BaseException:
        print((tmp_path / "server.log").read_text()[-5000:])
        raise
    finally:
        serve.stop_server(proc)
    assert r["model_id"] == "tiny" and r["completed"] == 7 and r["failed"] == 0, r["errors_sample"]
    assert r["total_input_tokens"] == 7 * 12 and r["total_output_tokens"] == 7 * 5
    # At most one chunk per token (every token of the synthetic vocabulary is text; a stream that lags
    # behind the engine sends the newest text at once), counted from the usage chunk either way.
    assert all(1 <= len(i) <= 4 for i in r["itls"]) and r["output_lens"] == [5] * 7
    assert r["max_concurrent_requests"] <= 3
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "median_e2el_ms", "duration"):
        assert r[key] > 0, key
    assert r["p50_tpot_ms"] == pytest.approx(r["median_tpot_ms"])


def test_peer_presets_mirror_the_engine_presets():
    from benchmarks.peer_hf import PRESET_METHODS, model_config

    assert set(PRESET_METHODS) == set(PRESETS)
    for name, make in PRESETS.items():  # two copies of the ModelConfig class: compare the fields
        assert dataclasses.asdict(model_config(name)) == dataclasses.asdict(make())


def test_model_suite_then_summarize(tmp_path, ceilings_file):
    """One engine for latency and throughput; then the bundle, the result files, the summary and the plot."""
    from benchmarks import summarize

    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "status").mkdir()
    run_module("benchmarks.model_suite", *ENGINE, "--case", "1x16x6", "--ttft-input-len", "32", "--repeats", "1",
               "--ttft-repeats", "1", "--num-prompts", "10", "--input-len", "16", "--output-len", "4",
               "--ceilings", ceilings_file, "--out", str(work / "results" / "llama8b.json"))
    suite = json.loads((work / "results" / "llama8b.json").read_text())
    assert suite["metrics"]["throughput"]["num_requests"] == 10 and suite["workload"]["offline"] == "10x16x4"
    peer = {"kind": "peer_hf", "model": "tiny", "device": "cpu", "workload": {"batch1": "16x6", "ttft_input_len": 32,
            "generate_batch": "4x16x4"}, "metrics": {"generate_batch1": {"decode_tok_s": 5.0}, "generate_ttft": {
            "ttft_ms": 50.0}, "generate_batch": {"output_tokens_per_second": 7.0, "manager_reused": True}}}
    (work / "results" / "peer8b.json").write_text(json.dumps(peer))
    for name, rc in (("llama8b", 0), ("peer8b", 0), ("serve", 124)):
        (work / "status" / f"{name}.json").write_text(json.dumps({"rc": rc, "reason": "", "log_tail": []}))
    bundle = summarize.bundle(work)
    assert list(bundle["stages"]) == ["llama8b", "peer8b", "serve"] and bundle["stages"]["serve"]["result"] is None

    results = summarize._results(bundle)
    out = tmp_path / "results"
    written = summarize.write_results(results, out)
    assert sorted(p.name for p in written) == ["model_suite_tiny_cpu.json", "peer_hf_tiny_cpu.json"]
    assert json.loads((out / "model_suite_tiny_cpu.json").read_text())["peer"]["batch1_decode_tok_s"] == 5.0
    summary = summarize.update_summary(out / "summary.json", summarize.headline(results, None))
    assert list(summary)[:7] == list(summarize.GOALS)
    b1 = summary["llama3_8b_batch1_tok_s"]
    assert b1["device"] == "cpu" and b1["peer"] == 5.0 and b1["goal"] == 180.0 and b1["value"] > 0
    assert "tiny" in b1["workload"] and b1["floor"] > 0
    offline = summary["llama3_8b_offline_1000x1024x1024_out_tok_s"]
    assert offline["num_prompts"] == 10 and offline["workload"] == "tiny, offline, 10 prompts x 16 in x 4 out"
    # The suite's warm-up counts as cold only when its compilation cache was empty (here CACHE is shared).
    cold = suite["engine"]["compilation_cache_empty_at_start"]
    assert (summary["warmup_cold_s"] is not None) == cold and summary["warmup_cached_s"] is None

    # A later run stopped during its offline part: its latency figures update, the offline figure stays.
    suite["metrics"]["throughput"] = None
    suite["metrics"]["latency"]["cases"][0]["decode_tok_s"] = 123.0
    later = summarize.update_summary(out / "summary.json", summarize.headline([{**suite, "stage": "llama8b"}], None))
    assert later["llama3_8b_batch1_tok_s"]["value"] == 123.0
    assert later["llama3_8b_offline_1000x1024x1024_out_tok_s"] == offline
    assert summarize.plot(results, tmp_path / "plot.png") and (tmp_path / "plot.png").stat().st_size > 0

    # A run without the peer's stage (`report` through its command line): --peer attaches a committed one.
    del bundle["stages"]["peer8b"]
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "peer.json").write_text(json.dumps({**peer, "metrics": {**peer["metrics"], "generate_ttft": {
        "ttft_ms": 60.0}}}))
    again = tmp_path / "again"
    run_module("benchmarks.summarize", "report", "--bundle", str(tmp_path / "bundle.json"), "--results-dir", str(again),
               "--peer", str(tmp_path / "peer.json"))
    assert sorted(p.name for p in again.glob("*.json")) == ["model_suite_tiny_cpu.json", "summary.json"]
    assert json.loads((again / "model_suite_tiny_cpu.json").read_text())["peer"]["ttft_ms"] == 60.0
    assert json.loads((again / "summary.json").read_text())["llama3_8b_ttft_1024_ms"]["peer"] == 60.0


def test_profile_sums_kernels_by_kind(tmp_path):
    from benchmarks import profile_step

    kernels = {"paged_attention_r16_k64_s1": {"ms": 4.0, "count": 64}, "nvjet_sm90_tst_128x192": {"ms": 3.0, "count": 128},
               "input_scatter_fusion_65": {"ms": 1.0, "count": 64}, "loop_add_fusion_3": {"ms": 0.5, "count": 126},
               "sort_27_1": {"ms": 0.2, "count": 2}, "input_reduce_fusion_2": {"ms": 0.1, "count": 2},
               "loop_reduce_fusion_31": {"ms": 0.3, "count": 64}}  # a reduction in every layer: not the sampler's
    s = profile_step.summarize(kernels, wall_ms=10.0, steps=2)
    assert s["device_busy_ms_per_step"] == pytest.approx(4.55) and s["idle_ms_per_step"] == pytest.approx(0.45)
    assert s["by_kind_ms_per_step"] == pytest.approx(
        {"attention": 2.0, "gemm": 1.5, "kv_write": 0.5, "other": 0.4, "sampling": 0.15})
    assert s["top_kernels"][0] == {"name": "paged_attention_r16_k64_s1", "kind": "attention", "ms_per_step": 2.0,
                                   "calls_per_step": 32.0}
    # The CLI end to end (a CPU trace has no GPU kernels: only the structure is checked).
    out = tmp_path / "profile.json"
    run_module("benchmarks.profile_step", *ENGINE, "--batch", "2", "--mixed", "2", "--context", "24", "--prefill", "40",
               "--offline", "12", "--output-len", "6", "--offline-steps", "3", "--steps", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert [p["workload"] for p in result["profiles"]] == [
        "decode, batch 2, context ~24", "2 decodes at context ~24 and the first 24 tokens of a fresh prompt of 24 in one step",
        "one prompt of 40 tokens, first token (TTFT)",
        "offline, 12 prompts x 24 in x 6 out, 3 engine steps once requests leave and join"]
    assert result["profiles"][3]["steps"] == 3 and result["profiles"][3]["wall_ms_per_step"] > 0
    assert result["profiles"][0]["steps"] == 2  # CPU: one decode step per engine step


def test_step_kinds_count_fused_calls_and_the_pipeline():
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", tokenizer=synthetic_tokenizer(PRESETS["tiny"]().vocab_size),
                                    max_model_len=128, num_pages=64, max_num_seqs=4, max_num_batched_tokens=64,
                                    token_buckets=(16, 64), page_buckets=(8,), decode_steps=4), progress=False)
    m = throughput.measure_throughput(engine, num_prompts=4, input_len=20, output_len=30)
    kinds = m["step_kinds"]
    assert sum(k["count"] for k in kinds.values()) == m["num_steps"] and m["peak_running"] == 4
    # 80 prompt tokens in steps of 64 and 16 (three sequences decode in the second), then fused
    # calls of 4 decode steps; every call but the first is queued while the one before is in flight.
    assert kinds["single_with_prompt_tokens"]["count"] == 2 and kinds["single_decode_only"]["count"] == 0
    assert kinds["fused"]["count"] == 8
    assert (kinds["single_with_prompt_tokens"]["queued_ahead"], kinds["fused"]["queued_ahead"]) == (1, 8)
    spent = sum(k["dispatch_s"] + k["wait_s"] for k in kinds.values())
    assert all(k["dispatch_s"] > 0 and k["wait_s"] > 0 for k in kinds.values() if k["count"])
    assert spent < m["elapsed_time"]


def test_offline_floor_takes_the_concurrency_the_engine_reached():
    """Requests take pages as they grow, so more run at once than the pages of their full lengths
    allow: 4 requests of 8 + 24 tokens (2 pages each at the end) all start in 6 usable pages. The
    floor is computed for the 4 that ran, not the 3 the full lengths would fit."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", tokenizer=synthetic_tokenizer(PRESETS["tiny"]().vocab_size),
                                    max_model_len=64, num_pages=7, max_num_seqs=4, max_num_batched_tokens=64,
                                    token_buckets=(16, 64), page_buckets=(4,)), progress=False)
    args = Namespace(num_prompts=4, input_len=8, output_len=24, max_seconds=None, data_seed=0)
    m, floors = throughput.run_throughput(engine, args, CEILINGS, log=lambda *_: None)
    assert throughput.concurrency(engine, 8, 24) == 3
    assert m["peak_running"] == m["concurrency"] == floors["offline"]["concurrency"] == 4


def test_step_variants_change_the_compiled_step(tmp_path):
    """benchmarks/step_variants.py on the tiny preset: each case timed, and a variant really reaches the
    compiled step (SwiGLU written with exp, or o as four products, compiles to another HLO than the
    default, which compiles to the same one twice); the per-kernel profile and the HLO files."""
    out, hlo_dir = tmp_path / "variants.json", tmp_path / "hlo"
    hlo_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_variants", str(out), "base", "swiglu_exp+split8",
                           "osplit4", "base"],
                          cwd=REPO, env={**ENV, "BENCH_SMOKE": "1", "STEP_PROFILE": "1", "STEP_HLO_DIR": str(hlo_dir)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m benchmarks.step_variants") and result["device"]
    cases = ["rows1_bucket4_ctx256", "rows1_bucket4_ctx1024", "rows192_bucket192_ctx1024"]
    for name, res in result["variants"].items():
        assert list(res) == cases, (name, res)
        assert all(res[c]["ms"] > 0 and res[c]["kernels"]["fusion"] > 0 for c in cases)
        assert all(isinstance(res[c]["kernels_us_per_step"], dict) for c in cases)  # empty on the CPU: no GPU kernels
        assert all((hlo_dir / f"{name.split(' ')[0]}_{c}.hlo.txt").read_text().startswith("HloModule") for c in cases)
    base, again = result["variants"]["base"], result["variants"]["base (4)"]
    for changed in (result["variants"]["swiglu_exp+split8"], result["variants"]["osplit4"]):
        for case in cases:
            assert base[case]["hlo_sha1"] == again[case]["hlo_sha1"] != changed[case]["hlo_sha1"], case


def test_sampler_benchmark_times_each_variant(tmp_path):
    """benchmarks/sampler.py on the CPU at a small vocabulary: every (variant, rows) case timed."""
    out = tmp_path / "sampler.json"
    run_module("benchmarks.sampler", "--rows", "1", "--rows", "3", "--vocab", "1000", "--profile", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m benchmarks.sampler") and result["vocab"] == 1000
    assert sorted(result["cases"]) == ["plain_rows1", "plain_rows3", "ranked_rows1", "ranked_rows3"]
    assert all(c["us"] >= c["min_us"] > 0 and isinstance(c["kernels_us_per_call"], dict)
               for c in result["cases"].values())


def test_schedule_counts_waves_and_preemptions():
    """benchmarks/schedule.py drives the engine's scheduler through an offline run: 12 prompts at a
    concurrency of 6 run in 2 waves, at 5 in 3 (the third of 2 decoding nearly alone), which costs
    steps; a cache too small for the concurrency preempts, an ample one does not."""
    from benchmarks.schedule import simulate

    kw = dict(num_prompts=12, input_len=32, output_len=32, max_num_batched_tokens=64, page_size=8)
    five, six = (simulate(s, 4096, **kw) for s in (5, 6))
    assert five["preemptions"] == six["preemptions"] == 0
    assert six["steps"] < 0.75 * five["steps"]
    tight = simulate(6, 6 * 48, **kw)  # six sequences of up to 63 cached tokens need 6 x 8 pages at once
    assert tight["preemptions"] > 0 and tight["peak_pages"] <= tight["pages"]
