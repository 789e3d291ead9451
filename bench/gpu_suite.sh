#!/usr/bin/env bash
# The GPU benchmark suite of the vectorized engine, end to end, in ONE call of at most 10 minutes on a
# GPU machine (one H100/H200, python3.12 with torch, no network). It
#   1. installs the wheels brought along in .whl/ (bench/gpu_wheels.sh downloads them) into /tmp/site,
#      and runs fedloom from this source tree (PYTHONPATH=src, no install, no dependencies fetched);
#   2. runs bench/throughput.py on cuda: MNIST IID, E=1, B=10, the McMahan 2NN and CNN at cohorts 10
#      and 100: vectorized + centralized in fp32, then in bf16; sequential (local steps capped at 20:
#      the same per-step work in less time); the vectorized engine with CUDA graphs at cohort 100;
#   3. runs bench/mcmahan.py's CNN IID row (E=5, B=10, C=0.1, target 99%) in bf16 under a round cap:
#      the accuracy check of the bf16 mode;
# writing JSON under $OUT (flat names, 8 files at most): env.json, throughput_fp32.json,
# throughput_bf16.json, mcmahan_cnn_bf16.json, throughput_sequential.json, throughput_graphs.json,
# suite.json (every step's status, exit code and seconds; the tables) and suite.log.
# Every step runs under its own time limit, cut further to what is left of the whole suite's
# deadline (FEDLOOM_GPU_SUITE_BUDGET_S, default 530 s), so the script ends in under ~9 minutes;
# a step that runs out keeps the rows it has written.
#
# Dry run (FEDLOOM_GPU_SUITE_DRY=1; tests/test_gpu_suite.py): device cpu, no wheel install, the same
# steps at tiny sizes (2NN at cohort 2 and the CNN mcmahan row for one round, 2 local steps), minus
# the bf16 centralized rows and the CUDA-graph step (a no-op on CPU), to stay well under a minute.
# PYTHON picks the interpreter (default python3).
#
# GPU session: the device tool's run with carry [".whl"] and command `bash bench/gpu_suite.sh`.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/fedloom-gpu-suite}
mkdir -p "$OUT"
DRY=${FEDLOOM_GPU_SUITE_DRY:-0}
PY=${PYTHON:-python3}
BUDGET=${FEDLOOM_GPU_SUITE_BUDGET_S:-530}
START=$(date +%s)
LOG="$OUT/suite.log"
STEPS="$OUT/.steps.tsv"
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_suite $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

if [ "$DRY" = "1" ]; then
  DEVICE=cpu
  MODELS=2nn; COHORTS=2; BIG=2; STEPS_ARG=(--max-steps 2); SEQ_STEPS=(--max-steps 2); REPEAT=1
  MC=(--max-rounds 1 --time-budget 30 --max-steps 2)
  BF16_ENGINES=vectorized; GRAPHS=0  # fewer processes: the dry run stays well under a minute
  LIM_ENV=30; LIM_FP32=60; LIM_BF16=60; LIM_MC=60; LIM_SEQ=60; LIM_GRAPH=60
else
  DEVICE=${FEDLOOM_GPU_SUITE_DEVICE:-cuda}
  MODELS=2nn,cnn; COHORTS=10,100; BIG=100; STEPS_ARG=(); SEQ_STEPS=(--max-steps 20); REPEAT=2
  MC=(--max-rounds 40 --time-budget 110)
  BF16_ENGINES=vectorized,centralized; GRAPHS=1
  LIM_ENV=60; LIM_FP32=130; LIM_BF16=120; LIM_MC=150; LIM_SEQ=90; LIM_GRAPH=60
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1; then
      say "wheel install FAILED (see suite.log)"
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no .whl/ wheels: relying on the installed packages (run bench/gpu_wheels.sh here and carry .whl)"
  fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of the budget); record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    say "$name: SKIPPED (${left}s left of the ${BUDGET}s budget)"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" >>"$STEPS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name: start (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status=failed
  say "$name: $status (exit $rc, $(($(date +%s) - t0))s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" >>"$STEPS"
}

TP=(bench/throughput.py --device "$DEVICE" --repeat "$REPEAT")

step env "$LIM_ENV" "$PY" - "$OUT/env.json" "$DEVICE" <<'PYEOF'
import json, os, platform, subprocess, sys, time
out, device = sys.argv[1], sys.argv[2]
info = {"python": sys.version, "platform": platform.platform(), "cpus": os.cpu_count(), "device": device}
import torch
info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                free_gb=round(torch.cuda.mem_get_info()[0] / 2**30, 1))
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = repr(exc)
for mod in ("pydantic", "pydantic_core", "numpy", "fedloom"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "?") + " @ " + os.path.dirname(m.__file__)
    except Exception as exc:  # noqa: BLE001
        info[mod] = f"MISSING: {exc!r}"
try:
    from fedloom.data.mnist import mnist_path
    info["mnist"] = str(mnist_path())
except Exception as exc:  # noqa: BLE001
    info["mnist"] = f"MISSING: {exc!r}"
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info, indent=1))
bad = [k for k in ("pydantic", "fedloom", "mnist") if str(info[k]).startswith("MISSING")]
sys.exit(1 if bad or (device.startswith("cuda") and not info["cuda_available"]) else 0)
PYEOF

step throughput_fp32 "$LIM_FP32" "$PY" "${TP[@]}" --json "$OUT/throughput_fp32.json" --models "$MODELS" \
  --cohorts "$COHORTS" --engines vectorized,centralized --precision fp32 "${STEPS_ARG[@]}"
step throughput_bf16 "$LIM_BF16" "$PY" "${TP[@]}" --json "$OUT/throughput_bf16.json" --models "$MODELS" \
  --cohorts "$COHORTS" --engines "$BF16_ENGINES" --precision bf16 "${STEPS_ARG[@]}"
step mcmahan_cnn_bf16 "$LIM_MC" "$PY" bench/mcmahan.py --json "$OUT/mcmahan_cnn_bf16.json" --rows cnn-iid \
  --engine vectorized --device "$DEVICE" --precision bf16 "${MC[@]}"
step throughput_sequential "$LIM_SEQ" "$PY" "${TP[@]}" --json "$OUT/throughput_sequential.json" --models "$MODELS" \
  --cohorts "$COHORTS" --engines sequential --precision fp32 "${SEQ_STEPS[@]}"
if [ "$GRAPHS" = "1" ]; then
  step throughput_graphs "$LIM_GRAPH" "$PY" "${TP[@]}" --json "$OUT/throughput_graphs.json" --models "$MODELS" \
    --cohorts "$BIG" --engines vectorized --precision bf16 --cuda-graphs "${STEPS_ARG[@]}"
else
  printf '%s\t%s\t%s\t%s\n' throughput_graphs "skipped (dry run)" 0 0 >>"$STEPS"
fi

# suite.json: the steps, and one table of every throughput row.
"$PY" - "$OUT" "$STEPS" "$DRY" "$BUDGET" "$(($(date +%s) - START))" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out, steps_path, dry, budget, wall = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
steps = []
for line in steps_path.read_text().splitlines():
    name, status, rc, secs = line.split("\t")
    steps.append({"step": name, "status": status, "exit": int(rc), "seconds": int(secs)})
rows = []
for name in ("throughput_fp32", "throughput_bf16", "throughput_sequential", "throughput_graphs"):
    f = out / f"{name}.json"
    if f.exists():
        for r in json.loads(f.read_text()).get("rows", []):
            rows.append({"file": f.name, **{k: r.get(k) for k in (
                "model", "cohort", "engine", "mode", "precision", "device", "samples_per_s", "round_s", "first_round_s",
                "time_to_first_round_s", "peak_gpu_mb", "peak_rss_mb", "chunk_size", "graph_replays", "graph_failure",
                "status", "reason")}})
lines = ["| model | cohort | engine (mode) | samples/s | time to first round (s) | peak GPU (MB) | file |",
         "|---|---:|---|---:|---:|---:|---|"]
for r in rows:
    sps = f"{r['samples_per_s']:.0f}" if r.get("samples_per_s") is not None else r.get("status") or "–"
    ttf = f"{r['time_to_first_round_s']:.2f}" if r.get("time_to_first_round_s") is not None else "–"
    gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "–"
    lines.append(f"| {r['model']} | {r['cohort']} | {r['engine']} ({r['mode']}) | {sps} | {ttf} | {gpu} | {r['file']} |")
mc = {}
f = out / "mcmahan_cnn_bf16.json"
if f.exists():
    for name, row in json.loads(f.read_text()).get("rows", {}).items():
        mc[name] = {k: row.get(k) for k in ("precision", "device", "mode", "rounds_run", "reached_round", "best_accuracy",
                                            "target", "paper_rounds", "sec_per_round", "stopped", "setup_s")}
summary = {"suite": "fedloom gpu_suite", "dry_run": dry, "budget_s": budget, "wall_s": wall, "steps": steps,
           "throughput_rows": rows, "table_md": "\n".join(lines), "mcmahan": mc}
(out / "suite.json").write_text(json.dumps(summary, indent=1))
print(summary["table_md"])
print(json.dumps({"steps": steps, "mcmahan": mc}, indent=1))
PYEOF
rm -f "$STEPS"
say "done in $(($(date +%s) - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
