#!/usr/bin/env bash
# What a lent GPU machine ran: the synthetic ablation at the paper's scale (1k / 5k / 25k images
# of 500 iterations) and the search step's cost on a GPU (`paper`), and data-free compressions on 5,120
# synthetic images of 500 iterations (`data-free`, two seeds).
#
#   SVDNAS_FMNIST=DIR OUT=DIR benchmarks/gpu_run.sh [paper|data-free|smoke] [SECONDS]
#
# Needs the post-training run directory runs/recovery-resnet18-1k/post (benchmarks/tables/data_limited_recovery.py
# makes it) and torch with CUDA; the package is used from src/ (no install). The lent machine had no
# ultralytics-thop: wheels in .whl/ (pip download) are installed into /tmp/site first. `smoke` runs
# every stage tiny (on the CPU when there is no GPU) to check the script itself. Each stage runs even
# if one before it failed (the ablation and data-free stages need the images of the first); the
# data-free stage gets what is left of SECONDS (default 560). Results and a log go to $OUT.
# Filed in the repository as benchmarks/results/synthetic_ablation/resnet18_paper_<gpu>.json,
# benchmarks/results/search_step_cost/ and benchmarks/results/gpu_run/ (the log, the data-free reports).
# Distillation runs at 0.001, the default when these ran (2026-11-26; the default is 0.01 since).
set -uo pipefail
scale=${1:-paper}
budget=${2:-560}
# the benchmarks run as modules of the benchmarks package, from the repository root
export PYTHONPATH=src:.:/tmp/site PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "!! wheels not installed"
fi
out=${OUT:?set OUT to a folder for the results}
work=${WORK:-/tmp/svdnas-gpu}
mkdir -p "$out" "$work"
py=${PYTHON:-python3}
dev=$($py -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
$py -c 'import torch, platform; print("torch", torch.__version__, "python", platform.python_version(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'

if [ "$scale" = smoke ]; then
  num=640 iters=3 counts="64 96 128" val=32 epochs=1 test="--test-images 200" parallel=4 repeats=1 batch=32
  freeargs="--epochs 1 --search-images 64 --proxy-images 32 --finetune-epochs 1" seeds="0"
elif [ "$scale" = data-free ]; then
  # 5,440 = 170 batches of 32, one pass: 5,120 to learn on, 64 validation, 256 for the fidelity figure
  num=5440 iters=500 val=64 parallel=170 freeargs="--finetune-epochs 20 --finetune-lr 0.001" seeds="0 1"
else
  # 25,088 = 784 batches of 32: the last 64 are validation, so the counts reach the paper's 25k
  num=25088 iters=500 counts="1000 5000 25000" val=64 epochs=20 test="" parallel=128 repeats=20 batch=128
fi

stage() { echo "== $1 (t=${SECONDS}s, $(date -u +%T))"; }

# How long would the images take? 10 timed iterations of $parallel batches (after 3 to warm up); if
# the whole generation would pass GEN_LIMIT seconds, the paper scale falls back to 5k images.
probe() {
  $py - "$dev" "$parallel" "$num" "$iters" <<'PY'
import sys, time, torch
from svdnas.models.build import build_model
from svdnas.recovery.synthetic import SynthConfig, generate_batches
dev, parallel, num, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = build_model("zoo:resnet18")[0].to(dev).eval().requires_grad_(False)
generate_batches(model, (1, 28, 28), 32, SynthConfig(iterations=3), list(range(parallel)), dev)
t0 = time.perf_counter()
generate_batches(model, (1, 28, 28), 32, SynthConfig(iterations=10), list(range(parallel)), dev)
per_iter = (time.perf_counter() - t0) / 10
print(round(per_iter * iters * num / (32 * parallel)))
PY
}

images() {
  stage "synthetic images: $num, $iters iterations, $parallel batches at a time"
  $py -m svdnas synth zoo:resnet18 --num "$num" --out "$work/synthetic.safetensors" --synth-iterations "$iters" \
    --synth-parallel "$parallel" --device "$dev" --overwrite --quiet &&
  cp "$work/synthetic.json" "$out/synthetic_meta.json"
}

ablation() {
  stage "ablation"
  rm -f "$work/synthetic-plain.safetensors" "$work/synthetic-plain.json"
  # shellcheck disable=SC2086
  $py -m benchmarks.tables.synthetic_ablation --run runs/recovery-resnet18-1k/post --synthetic "$work/synthetic.safetensors" \
    --counts $counts --val "$val" --epochs "$epochs" --lr 0.001 $test --device "$dev" --parallel "$parallel" \
    --out "$out/synthetic_ablation_resnet18_paper.json"
}

step_cost() {
  stage "search step cost"
  $py -m benchmarks.tables.search_step_cost --model zoo:resnet18 --batch "$batch" --repeats "$repeats" --device "$dev" \
    --out "$out/search_cost_gpu_zoo.json"
  $py -m benchmarks.tables.search_step_cost --model module:benchmarks/bench_models.py:resnet18_full_fmnist --max-groups 1 --batch "$batch" \
    --repeats "$repeats" --device "$dev" --out "$out/search_cost_gpu_full.json"
}

data_free() {
  local left seed
  for seed in $seeds; do
    left=$((budget - SECONDS))
    [ "$left" -gt 30 ] || { echo "!! no time left for seed $seed"; return 1; }
    stage "data-free compress, seed $seed, on the images above, ${left}s left"
    # shellcheck disable=SC2086
    timeout "$left" $py -m svdnas compress zoo:resnet18 --data fmnist --mode data-free --reduction 0.6 \
      --synthetic "$work/synthetic.safetensors" --synth-val "$val" --synth-test 256 $freeargs --out "$work/data-free-$seed" \
      --overwrite --seed "$seed" --device "$dev" --quiet &&
    cp "$work/data-free-$seed/report.json" "$out/data_free_5k_seed$seed.json" || return 1
  done
}

{
  if [ "$scale" = paper ]; then
    projected=$(probe) || projected=0
    echo "projected generation of $num images: ${projected}s"
    if [ "$projected" -gt "${GEN_LIMIT:-240}" ]; then
      num=5120 counts="1000 2500 5000"
      echo "too slow for 25k here: $num images, counts $counts"
    fi
  fi
  images || echo "!! images failed"
  if [ "$scale" != data-free ]; then
    ablation || echo "!! ablation failed"
    step_cost || echo "!! step cost failed"
  fi
  if [ "$scale" != paper ]; then
    data_free || echo "!! data-free failed or ran out of time"
  fi
  stage "done"
} 2>&1 | tee "$out/gpu_run_$scale.log"
