#!/usr/bin/env bash
# The benchmark run of issue 6 on one GPU, in one call of about nine minutes.
#
#   benchmarks/run_gpu.sh [STAGE ...]          (from the repository root)
#
# Stages, in this order by default (the headline figures first):
#   roofline   the device's ceilings (copy bandwidth, bf16 matmul rate) and every workload's floor
#   llama8b    Llama-3.1-8B shape: batch-1 decode, TTFT at 1024, offline 1000x1024x1024 (N fitted to 75 s);
#              its engine starts with an empty compilation cache: its warm-up is the cold one
#   warmup8b   the same engine started again in a fresh process with the cache llama8b filled
#   peer8b     HF transformers generate (batch 1, TTFT) and generate_batch on the 8B shape
#   llama1b    Llama-3.2-1B shape: the same workloads as llama8b (N fitted to 60 s)
#   peer1b     the HF peer on the 1B shape
#   serve      pagedjax serve (1B shape) under benchmarks/serve.py: 200 prompts x 1024 in x 128 out,
#              all at once, at most 32 in flight (needs the .whl wheels: starlette, uvicorn)
#   profile8b  benchmarks/profile_step.py on the 8B engine: GPU time per kernel kind of a batch-1 and a
#              batch-250 decode step, a step where a prompt joins 249 decodes, and the TTFT step
#              (PROFILE_ARGS replaces its workload flags), with a timeline of the TTFT and decode traces
#   attention  benchmarks/attention.py
#   matmul     benchmarks/matmul.py: the fused projection kernel checked and timed against XLA's ops on the
#              8B shapes, 16 and 64 rows, with a sweep of block shapes
#   matmul8b   the llama8b latency cases with --matmul-backend pallas (llama8b in the same call is the baseline)
#              (profile8b, attention, matmul and matmul8b are not in the default list)
#
# BUDGET_8B / BUDGET_1B (seconds, default 75 / 60) bound the offline runs: N is lowered from 1000
# to what fits. Give 280 / 150 (one stage per call) for the full 1000 prompts.
#
# Each stage runs under a time cap and inside the run's deadline (BENCH_BUDGET_S, default 570 s);
# a stage that fails or runs out of time is recorded and the next one still runs; a stage
# that no longer fits is skipped and recorded, to be run in a later call by name.
#
# Output, in $OUT (else ./bench-out), at most five files:
#   run.log        everything printed
#   bundle.json    every stage's result JSON, or its exit status, reason and log tail
#   summary.json   the headline figures; plot.png: ours, the HF peer and the floor
#   logs.tar.gz    each stage's full log
# To commit: python -m benchmarks.summarize report --bundle bundle.json (writes benchmarks/results/).
#
# BENCH_SMOKE=1 runs every stage at toy sizes on the "tiny" preset, to check the script on a CPU
# (PYTHON and PEER_PYTHON name the interpreters; the GPU machine's python3 has everything).
#
# Engine settings (the defaults are sized for CPU tests):
#   --max-model-len 2048       the longest request (1024 + 1024); block tables stay 128 pages wide
#   --page-size 16             the page size of the issue's goals
#   --max-num-batched-tokens 1024 (8B) / 2048 (1B)
#                              a 1024-token prompt fits in one step (TTFT); with a full decode batch
#                              running, a step carries it plus a prompt chunk of 1024 - S tokens,
#                              compute-bound already (8B: 1024 rows, ~14 TFLOP). 8B offline, one call
#                              (results/offline-budget_h100): 1024 -> 7,970, 2048 -> 7,922, 512 -> 7,931
#                              output tok/s: more steps carry decode rows at the matmul rate
#   --max-num-seqs 256 (1B) / 250 (8B)
#                              vLLM's default concurrency is 256; 8B's K/V (128 KiB a token) for 250
#                              sequences of 2048 tokens is 62.5 GiB, what 0.972 of the pool holds beside
#                              the 15 GiB of weights, so the offline run never preempts (256 would:
#                              results/offline-concurrency_h100); 1000 requests at 250 run in four full
#                              waves where 224 leaves a fifth of 104 (results/schedule_8b_offline.json)
#   --memory-utilization 0.972 (8B) / 0.9 (1B)
#                              of jax's pool, XLA_PYTHON_CLIENT_MEM_FRACTION=0.975 of the GPU (`pagedjax`
#                              sets 0.95); the rest is the steps' scratch, which the engine checks at
#                              start-up (warmup_report.scratch_bytes); the steps are compiled before the
#                              cache is allocated, so XLA's autotuner has the whole pool
#   --token-buckets 4,16,64,250,512,1024 (8B) / 16,64,256,1024,1280,1536,2048 (1B)
#                              batch-1 decode (8B: one row padded to 4 tokens decodes 3% faster than
#                              padded to 16, results/token-buckets_h100), small batches, a full decode batch, (8B) a full batch
#                              beside a short chunk, one 1024-token prompt (TTFT) or a full step;
#                              (1B) a full decode batch beside one or two fresh prompts (S decodes +
#                              1024 no longer pads to 2048), a full prefill chunk
#   block tables stay one width (128 pages, the default with the GPU kernel, whose cost follows
#   each row's length): 6 (8B) / 7 (1B) step graphs plus the fused decode graphs of the buckets <= S (3)
set -u

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.975}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then  # packages the GPU machine lacks (starlette, uvicorn, gguf)
  S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" || echo "installing .whl/ failed: the serve stage will fail"
else
  echo "no .whl/ wheels: the serve stage will fail (starlette, uvicorn are not installed)"
fi

out=${OUT:-bench-out}
mkdir -p "$out"
work=$(mktemp -d)
mkdir -p "$work/results" "$work/status" "$work/logs"
exec > >(tee -a "$out/run.log") 2>&1
start=$(date +%s)
deadline=$(( start + ${BENCH_BUDGET_S:-570} ))
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(roofline llama8b warmup8b peer8b llama1b peer1b serve)

py=${PYTHON:-python3} peer_py=${PEER_PYTHON:-${PYTHON:-python3}}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "benchmark run: stages ${stages[*]}; ${device:-no nvidia-smi}; $($py --version 2>&1)"

roofline="$work/results/roofline.json"
common=(--page-size 16 --max-model-len 2048)
m8=llama-3.1-8b m1=llama-3.2-1b vocab=128256
engine8b=(--model $m8 "${common[@]}" --memory-utilization 0.972 --max-num-seqs 250
          --max-num-batched-tokens 1024 --token-buckets 4,16,64,250,512,1024)
engine1b=(--model $m1 "${common[@]}" --memory-utilization 0.9 --max-num-seqs 256
          --max-num-batched-tokens 2048 --token-buckets 16,64,256,1024,1280,1536,2048)
workloads=(--case 1x128x256 --ttft-input-len 1024 --repeats 3 --ttft-repeats 10
           --num-prompts 1000 --input-len 1024 --output-len 1024)
budget8b=${BUDGET_8B:-75} budget1b=${BUDGET_1B:-60}  # seconds the offline run may take (N fitted to it)
peer8b=(--batch1 128x128 --ttft-input-len 1024 --cb 32x1024x128 --repeats 2)
peer1b=(--batch1 128x128 --ttft-input-len 1024 --cb 64x1024x128 --repeats 2)
served=(--num-prompts 200 --input-len 1024 --output-len 128 --max-concurrency 32)
read -ra profiled <<< "${PROFILE_ARGS:---batch 1 --batch 250 --mixed 249 --context 1024 --prefill 1024}"
if [ "${BENCH_SMOKE:-0}" = 1 ]; then  # every stage at toy sizes on the "tiny" preset: checks this script on a CPU
  small=(--model tiny --max-model-len 256 --max-num-batched-tokens 64 --token-buckets 16,64 --page-buckets 16)
  m8=tiny m1=tiny vocab=49152
  engine8b=("${small[@]}" --max-num-seqs 8) engine1b=("${small[@]}" --max-num-seqs 16)
  workloads=(--case 1x16x16 --ttft-input-len 64 --repeats 2 --ttft-repeats 2 --num-prompts 16 --input-len 32 --output-len 16)
  budget8b=10 budget1b=10
  peer8b=(--batch1 16x8 --ttft-input-len 64 --cb 8x32x8 --repeats 2 --dtype float32)
  peer1b=("${peer8b[@]}")
  served=(--num-prompts 16 --input-len 32 --output-len 8 --max-concurrency 4)
  profiled=(--batch 1 --batch 4 --mixed 3 --context 32 --prefill 64)
fi
engine8b+=(--compilation-cache-dir "$work/cache-8b")
engine1b+=(--compilation-cache-dir "$work/cache-1b")
ceilings() { [ -f "$roofline" ] && echo --ceilings "$roofline"; }

status() {  # NAME RC SECONDS REASON
  $py - "$@" "$work" <<'EOF'
import json, pathlib, sys
name, rc, seconds, reason, work = sys.argv[1:6]
log = pathlib.Path(work, "logs", f"{name}.log")
tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
pathlib.Path(work, "status", f"{name}.json").write_text(json.dumps(
    {"rc": int(rc), "seconds": float(seconds), "reason": reason, "log_tail": tail}, indent=1))
EOF
  $py -m benchmarks.summarize bundle --work "$work" --out "$out/bundle.json" || true
  tar -czf "$out/logs.tar.gz" -C "$work" logs status 2>/dev/null || true
}

stage() {  # NAME CAP_SECONDS MIN_SECONDS COMMAND...
  local name=$1 cap=$2 need=$3; shift 3
  local now left t0 rc reason
  now=$(date +%s); left=$(( deadline - now ))
  if (( left < need )); then
    echo "=== $name: skipped, ${left} s left of the run's budget (needs ${need} s); run it by name in another call"
    status "$name" 125 0 "skipped: ${left} s left, needs ${need} s"
    return
  fi
  (( cap > left )) && cap=$left
  echo "=== $name (at $(( now - start )) s; up to ${cap} s)"
  t0=$(date +%s)
  timeout -k 20 "$cap" "$@" 2>&1 | tee "$work/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in 0) reason=ok ;; 124|137) reason="timed out after ${cap} s" ;; *) reason="failed" ;; esac
  echo "=== $name: $reason (rc $rc, $(( $(date +%s) - t0 )) s)"
  status "$name" "$rc" "$(( $(date +%s) - t0 ))" "$reason"
}

for s in "${stages[@]}"; do
  case $s in
    roofline)
      stage roofline 90 20 $py -m benchmarks.roofline --models "$m1,$m8" --out "$roofline" ;;
    llama8b)
      stage llama8b $(( budget8b + 255 )) 120 $py -m benchmarks.model_suite "${engine8b[@]}" "${workloads[@]}" \
        --max-seconds $budget8b $(ceilings) --out "$work/results/llama8b.json" ;;
    warmup8b)
      stage warmup8b 120 40 $py -m benchmarks.throughput --warmup-only "${engine8b[@]}" \
        --out "$work/results/warmup8b.json" ;;
    llama1b)
      stage llama1b $(( budget1b + 270 )) 90 $py -m benchmarks.model_suite "${engine1b[@]}" "${workloads[@]}" \
        --max-seconds $budget1b $(ceilings) --out "$work/results/llama1b.json" ;;
    peer8b)
      stage peer8b 150 60 $peer_py -m benchmarks.peer_hf --model $m8 "${peer8b[@]}" --out "$work/results/peer8b.json" ;;
    peer1b)
      stage peer1b 120 45 $peer_py -m benchmarks.peer_hf --model $m1 "${peer1b[@]}" --out "$work/results/peer1b.json" ;;
    serve)
      tok=$($py -c "from benchmarks.common import synthetic_tokenizer as t; print(t($vocab))")
      stage serve 150 60 $py -m benchmarks.serve \
        --launch "${engine1b[*]} --tokenizer $tok --max-queued-requests 1024" --server-log "$work/logs/server.log" \
        "${served[@]}" --vocab-size $vocab --request-rate inf --metric-percentiles 50,90,99 --preset $m1 \
        $(ceilings) --device "$device" --out "$work/results/serve.json" ;;
    profile8b)
      stage profile8b 200 60 $py -m benchmarks.profile_step "${engine8b[@]}" "${profiled[@]}" \
        --out "$work/results/profile8b.json" ;;
    attention)
      stage attention 240 60 $py benchmarks/attention.py "$work/results/attention.json" ;;
    matmul)
      stage matmul 240 60 $py -m benchmarks.matmul --rows 16 --rows 64 --sweep --out "$work/results/matmul.json" ;;
    matmul8b)
      stage matmul8b 200 90 $py -m benchmarks.latency "${engine8b[@]}" --matmul-backend pallas --case 1x128x256 \
        --case 64x128x256 --ttft-input-len 1024 $(ceilings) --out "$work/results/matmul8b.json" ;;
    *)
      echo "unknown stage $s (known: roofline llama8b warmup8b llama1b peer8b peer1b serve profile8b attention matmul matmul8b)" ;;
  esac
done

echo "=== summary (at $(( $(date +%s) - start )) s)"
$py -m benchmarks.summarize report --bundle "$out/bundle.json" --results-dir "$work/report" \
  --summary "$out/summary.json" --plot "$out/plot.png" || echo "summarize failed"
tar -czf "$out/logs.tar.gz" -C "$work" logs status 2>/dev/null || true
echo "done in $(( $(date +%s) - start )) s; files in $out: $(ls "$out" | tr '\n' ' ')"
