"""Benchmark harness: latency, offline throughput, HTTP serving, the HF peer and the roofline.

Run the scripts as modules from the repository root (`python -m benchmarks.latency ...`; latency,
throughput and serve also as `pagedjax bench NAME ...`);
`benchmarks/run_gpu.sh` runs the whole set on one GPU and `benchmarks/summarize.py`
turns its output into the committed files under `benchmarks/results/`.
"""
