"""Turn one benchmark run's output into the committed result files, the headline summary and a plot.

    python -m benchmarks.summarize bundle --work DIR --out bundle.json
    python -m benchmarks.summarize report --bundle bundle.json [--results-dir benchmarks/results]
        [--summary benchmarks/results/summary.json] [--plot benchmarks/results/benchmarks_<device>.png]
        [--peer benchmarks/results/peer_hf_<model>_<device>.json ...]

`bundle` gathers the stage results of a run (DIR/results/<stage>.json, DIR/status/<stage>.json
with each stage's exit status and log tail) into one file, so a run's output fits in a few
files. `run_gpu.sh` calls it after every stage.

`report` writes one file per result under the results folder, named kind_model_device.json
(the HF peer's figures are attached to the engine results of the same model shape as
"peer"), updates `summary.json` with the headline figures of the issue, each with its
device, the workload actually run, its floor, the peer's figure and the goal (keys this run
did not measure keep their earlier value), and draws the plot when matplotlib is there.
`--peer` attaches an earlier run's peer result to a run that has none for that model shape
(the peer runs no engine code, so its figures stand until its own setup changes).
The decode-attention figure comes from `benchmarks/attention.py` results: a stage of the
same run if there is one, else the newest committed attention_*.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.common import REPO, write_json

RESULTS = REPO / "benchmarks" / "results"

GOALS = {  # the goals (H100 80GB, bf16, one GPU)
    "llama3_8b_batch1_tok_s": 180.0,
    "llama3_8b_ttft_1024_ms": 30.0,
    "llama3_8b_offline_1000x1024x1024_out_tok_s": 8000.0,
    "llama32_1b_offline_1000x1024x1024_out_tok_s": None,
    "decode_attention_TBps": 2.4,
    "warmup_cold_s": 60.0,
    "warmup_cached_s": 15.0,
}
ATTENTION_CASE = "decode b256 ctx1536 p16 runner"  # the engine's layout of the decode shape


# ---- bundle ------------------------------------------------------------------------------


def bundle(work: Path) -> dict:
    """Every stage's result (or its failure) in run order."""
    stages = {}
    for status_file in sorted((work / "status").glob("*.json"), key=lambda p: p.stat().st_mtime):
        status = json.loads(status_file.read_text())
        name = status_file.stem
        result_file = work / "results" / f"{name}.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        if isinstance(result, dict):
            result.setdefault("kind", name)  # benchmarks/attention.py writes no kind
            result.setdefault("stage", name)
        stages[name] = {"status": status, "result": result}
    return {"stages": stages}


# ---- report ------------------------------------------------------------------------------


def device_slug(device: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' -> 'cpu'."""
    if not device:
        return "unknown"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", device)).lower().strip("-")


def _results(b: dict) -> list[dict]:
    return [{"stage": name, **s["result"]} for name, s in b["stages"].items() if s.get("result")]


def _find(results: list[dict], kind: str, model: str | None = None) -> dict | None:
    hits = [r for r in results if r.get("kind") == kind and (model is None or r.get("model") == model)]
    return hits[-1] if hits else None


def peer_summary(peer: dict | None) -> dict | None:
    """The peer's figures to set beside ours."""
    if not peer:
        return None
    m = peer["metrics"]
    cb = m.get("generate_batch") or {}
    cb_tok_s = cb.get("output_tokens_per_second")
    if cb and not cb.get("manager_reused") and cb.get("output_tokens_per_second_in_span"):
        # the timed call also started the manager: count from its first request instead
        cb_tok_s = cb["output_tokens_per_second_in_span"]
    return {
        "what": f"HF transformers {peer.get('transformers_version')} (torch {peer.get('torch_version')})",
        "device": peer.get("device"),
        "batch1_decode_tok_s": (m.get("generate_batch1") or {}).get("decode_tok_s"),
        "batch1_e2e_tok_s": (m.get("generate_batch1") or {}).get("e2e_tok_s"),
        "batch1_workload": peer["workload"].get("batch1"),
        "ttft_ms": (m.get("generate_ttft") or {}).get("ttft_ms"),
        "ttft_input_len": peer["workload"].get("ttft_input_len"),
        "generate_batch_out_tok_s": cb_tok_s,
        "generate_batch_total_tok_s": cb.get("tokens_per_second"),
        "generate_batch_workload": peer["workload"].get("generate_batch"),
        "errors": m.get("errors") or None,
    }


def _entry(value, unit, result, workload, floor=None, peer=None, goal=None, **extra) -> dict:
    return {"value": value, "unit": unit, "device": result.get("device"), "workload": workload, "floor": floor,
            "peer": peer, "goal": goal, "date": result.get("date"), "jax_version": result.get("jax_version"),
            **extra}


def headline(results: list[dict], attention: dict | None) -> dict:
    """The summary keys this run measured."""
    out = {}
    for stage, model, prefix in (("llama8b", "llama-3.1-8b", "llama3_8b"), ("llama1b", "llama-3.2-1b", "llama32_1b")):
        # run_gpu.sh's stage, else the model; the entries name the model actually run either way
        staged = [r for r in results if r.get("kind") == "model_suite" and r.get("stage") == stage]
        suite = staged[-1] if staged else _find(results, "model_suite", model)
        if not suite:
            continue
        model = suite["model"]
        peer = peer_summary(_find(results, "peer_hf", model))
        lat, thr = suite["metrics"]["latency"], suite["metrics"]["throughput"]
        floors = suite["roofline"]
        if prefix == "llama3_8b":
            out |= warmup_figures(results, suite)
        b1 = next((c for c in lat["cases"] if c["batch"] == 1), None)
        if b1 and prefix == "llama3_8b":
            f = next(c for c in floors["latency"]["cases"] if c["case"] == f"1x{b1['input_len']}x{b1['output_len']}")
            out[f"{prefix}_batch1_tok_s"] = _entry(
                b1["decode_tok_s"], "tokens/s", suite,
                f"{model}, batch 1, {b1['input_len']}-token prompt, {b1['output_len']} tokens out: median decode step",
                floor=f["decode_tok_s"], peer=peer and peer["batch1_decode_tok_s"],
                goal=GOALS[f"{prefix}_batch1_tok_s"])
        if lat.get("ttft") and prefix == "llama3_8b":
            t = lat["ttft"]
            out[f"{prefix}_ttft_1024_ms"] = _entry(
                t["ttft_ms"], "ms", suite, f"{model}, one {t['input_len']}-token prompt on an idle engine",
                floor=floors["latency"]["ttft"]["floor_ms"], peer=peer and peer["ttft_ms"],
                goal=GOALS[f"{prefix}_ttft_1024_ms"], peer_input_len=peer and peer["ttft_input_len"])
        key = f"{prefix}_offline_1000x1024x1024_out_tok_s"
        if thr and "skipped" in thr:
            out[key] = _entry(None, "output tokens/s", suite, f"{model}: not run: {thr['skipped']}", goal=GOALS[key])
        if not thr or "num_requests" not in thr:
            continue
        n, i, o = thr["num_requests"], thr["input_len"], thr["output_len"]
        out[key] = _entry(
            thr["output_tokens_per_second"], "output tokens/s", suite,
            f"{model}, offline, {n} prompts x {i} in x {o} out"
            + ("" if n == thr["requested_num_prompts"] else f" (N lowered from {thr['requested_num_prompts']} "
               f"to fit {thr['budget_s']:.0f} s)"),
            floor=floors["offline"]["output_tok_s"], peer=peer and peer["generate_batch_out_tok_s"],
            goal=GOALS[key], num_prompts=n, total_tok_s=thr["tokens_per_second"], concurrency=thr["concurrency"],
            peer_workload=peer and peer["generate_batch_workload"])
    if attention:
        run = _attention_figure(attention)
        if run:
            out["decode_attention_TBps"] = _entry(
                run["tb_per_s"], "TB/s", attention, "paged decode attention, batch 256, context ~1536, page 16, "
                "32 query / 8 KV heads, head_dim 128, bf16 (benchmarks/attention.py)",
                goal=GOALS["decode_attention_TBps"], impl=run["impl"], median_ms=run.get("median_ms"),
                xla_reference_TBps=run.get("reference_TBps"))
    return out


def warmup_figures(results: list[dict], suite: dict) -> dict:
    """Cold and cached warm-up of the suite's engine: from its `--warmup-probe`, or else from the suite's
    own start (empty cache) and a later `throughput --warmup-only` process on the cache it filled."""
    model, info = suite["model"], suite["engine"]
    what = f"{model}: every bucket compiled ({info['num_step_graphs']} step graphs and their samplers), fresh process"
    probe = suite["metrics"].get("warmup")
    if probe:
        cold, cached, src = probe["warmup_cold_s"], probe["warmup_cached_s"], (suite, suite)
    else:
        again = [r for r in results if r.get("kind") == "warmup" and r.get("model") == model
                 and not r["metrics"].get("compilation_cache_empty_at_start")]
        cold = info["warmup_seconds"] if info.get("compilation_cache_empty_at_start") else None
        cached = again[-1]["metrics"]["warmup_seconds"] if again else None
        src = (suite, again[-1] if again else suite)
    out = {}
    if cold is not None:
        out["warmup_cold_s"] = _entry(cold, "s", src[0], what + ", empty persistent compilation cache",
                                      goal=GOALS["warmup_cold_s"])
    if cached is not None:
        out["warmup_cached_s"] = _entry(cached, "s", src[1], what + ", persistent compilation cache filled",
                                        goal=GOALS["warmup_cached_s"])
    return out


def _attention_figure(attention: dict) -> dict | None:
    for case in attention.get("cases", []):
        if not case["case"].startswith(ATTENTION_CASE):
            continue
        runs = [r for r in case["runs"] if "tb_per_s" in r]
        ref = next((r["tb_per_s"] for r in runs if r["impl"] == "xla reference"), None)
        kernel = [r for r in runs if r["impl"] != "xla reference"]
        if kernel:
            best = max(kernel, key=lambda r: r["tb_per_s"])
            return {**best, "reference_TBps": ref}
    return None


def _newest_attention_file() -> dict | None:
    files = sorted(RESULTS.glob("attention_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def write_results(results: list[dict], folder: Path, peers_from: list[dict] | None = None) -> list[Path]:
    """One file per result; engine results carry the peer of their model shape (found in `peers_from`,
    by default `results`)."""
    written = []
    for r in results:
        r = dict(r)
        if r.get("kind") in ("model_suite", "latency", "throughput", "serve") and r.get("peer") is None:
            r["peer"] = peer_summary(_find(peers_from or results, "peer_hf", r.get("model")))
        model = r.get("model") or "all"
        path = folder / f"{r['kind']}_{model}_{device_slug(r.get('device'))}.json"
        write_json(path, r)
        written.append(path)
    return written


def update_summary(path: Path, fresh: dict) -> dict:
    old = json.loads(path.read_text()) if path.is_file() else {}
    summary = {k: old.get(k) for k in GOALS} | {k: v for k, v in old.items() if k not in GOALS}
    # a figure this run could not measure replaces no earlier figure, but fills an empty key with the reason
    summary.update({k: v for k, v in fresh.items() if v and (v.get("value") is not None or not summary.get(k))})
    write_json(path, summary)
    return summary


def plot(results: list[dict], path: Path) -> bool:
    """Ours, the HF peer and the floor, per model shape: offline output tokens/s, batch-1 tokens/s, TTFT."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    suites = [r for r in results if r.get("kind") == "model_suite"]
    if not suites:
        return False
    panels = [("offline output tokens/s", "offline"), ("batch-1 decode tokens/s", "batch1"), ("TTFT (ms)", "ttft")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    colors = {"pagedjax": "#1f77b4", "HF transformers": "#ff7f0e", "floor": "#bbbbbb"}
    for ax, (title, what) in zip(axes, panels):
        labels, series = [], {k: [] for k in colors}
        for s in suites:
            peer = peer_summary(_find(results, "peer_hf", s["model"])) or {}
            lat, thr, fl = s["metrics"]["latency"], s["metrics"]["throughput"], s["roofline"]
            if what == "offline":
                if not thr or "num_requests" not in thr:
                    continue
                labels.append(f"{s['model']}\n{thr['num_requests']}x{thr['input_len']}x{thr['output_len']}")
                vals = (thr["output_tokens_per_second"], peer.get("generate_batch_out_tok_s"),
                        fl["offline"]["output_tok_s"])
            elif what == "batch1":
                b1 = next((c for c in lat["cases"] if c["batch"] == 1), None)
                if not b1:
                    continue
                f = next(c for c in fl["latency"]["cases"] if c["case"] == f"1x{b1['input_len']}x{b1['output_len']}")
                labels.append(f"{s['model']}\n1x{b1['input_len']}x{b1['output_len']}")
                vals = (b1["decode_tok_s"], peer.get("batch1_decode_tok_s"), f["decode_tok_s"])
            else:
                if not lat.get("ttft"):
                    continue
                labels.append(f"{s['model']}\nprompt {lat['ttft']['input_len']}")
                vals = (lat["ttft"]["ttft_ms"], peer.get("ttft_ms"), fl["latency"]["ttft"]["floor_ms"])
            for k, v in zip(colors, vals):
                series[k].append(v or 0.0)
        width = 0.27
        for j, (name, vals) in enumerate(series.items()):
            xs = [i + (j - 1) * width for i in range(len(vals))]
            bars = ax.bar(xs, vals, width, label=name, color=colors[name])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title)
        if any(v > 0 for vals in series.values() for v in vals):  # a log axis needs a positive value
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    dev = suites[0].get("device")
    fig.suptitle(f"{dev}, jax {suites[0].get('jax_version')}, {suites[0].get('date', '')[:10]} "
                 "(floor: measured bandwidth / matmul rate)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="gather a run's stage results into one file")
    b.add_argument("--work", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    r = sub.add_parser("report", help="write result files, the summary and the plot")
    r.add_argument("--bundle", required=True, type=Path)
    r.add_argument("--results-dir", type=Path, default=RESULTS)
    r.add_argument("--summary", type=Path, help="default: RESULTS_DIR/summary.json")
    r.add_argument("--plot", type=Path, help="default: RESULTS_DIR/benchmarks_<device>.png")
    r.add_argument("--peer", type=Path, action="append", default=[],
                   help="an earlier peer_hf result for a model shape this run has no peer of (repeatable)")
    args = p.parse_args()

    if args.command == "bundle":
        write_json(args.out, bundle(args.work))
        return
    data = json.loads(args.bundle.read_text())
    results = _results(data)
    attention = _find(results, "attention") or _newest_attention_file()
    # benchmarks/attention.py's results are committed by whoever runs it, under its own name
    earlier = [json.loads(f.read_text()) for f in args.peer]
    earlier = [e for e in earlier if not _find(results, "peer_hf", e.get("model"))]
    results += earlier  # attached to this run's results, not written again: they are committed
    written = write_results([r for r in results if r.get("kind") not in (None, "attention") and r not in earlier],
                            args.results_dir, results)
    summary = update_summary(args.summary or args.results_dir / "summary.json", headline(results, attention))
    devices = {r.get("device") for r in results if r.get("kind") == "model_suite"}
    plot_path = args.plot or args.results_dir / f"benchmarks_{device_slug(next(iter(devices), None))}.png"
    drew = plot(results, plot_path)
    failed = {k: s["status"] for k, s in data["stages"].items() if s["status"].get("rc") != 0}
    print("wrote " + ", ".join(str(w.name) for w in written) + (f", {plot_path.name}" if drew else ""))
    for k, v in summary.items():
        if isinstance(v, dict):
            print(f"  {k}: {v.get('value')} {v.get('unit', '')} ({v.get('workload')}; {v.get('device')})")
        else:
            print(f"  {k}: {v}")
    for k, v in failed.items():
        print(f"  stage {k} failed: rc {v.get('rc')} {v.get('reason', '')}")


if __name__ == "__main__":
    main()
