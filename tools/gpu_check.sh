#!/usr/bin/env bash
# The project's one-shot GPU check (docs/BENCHMARKS.md): ~8 minutes on one GPU, from the repository root.
#
#   bash tools/gpu_check.sh                      # on a GPU: results in out/gpu_check/
#   bash tools/gpu_check.sh --device cpu         # dry mode: the same steps at tiny sizes on the CPU (gloo, no --compile)
#   options: --device cuda|cpu  --out DIR  --budget SECONDS (default 480; the dry mode's steps get 5x their limits)
#            --official PATH: a clone of NVlabs/edm (default $OFFICIAL): step 2 times this project's networks against
#            it (tools/bench_official.py, paired ratios); without one, ours alone (img/s, TFLOP/s)
#
# Every step runs under its own timeout and one overall deadline, in priority order (later steps are skipped when
# time runs out); a failing step is recorded and the next one runs. DIR/summary.txt: one line per step (exit
# status, seconds) and the figures (img/s, TFLOP/s per GPU, MFU, memory); DIR/log.txt: everything printed;
# DIR/runs.tgz: the run folders without weights. Only command lines are used (07, 08, pytest), so the script
# follows the chapters as long as their options do. The FID steps use a stand-in TorchScript detector (no
# network on a GPU box): their img/s is the sampler's and the pipeline's, not Inception's.
set -u
D=cuda OUT=out/gpu_check BUDGET=480 OFFICIAL=${OFFICIAL:-}
while (( $# )); do
  case $1 in
    --device) D=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --official) OFFICIAL=$2; shift 2 ;;
    *) echo "error: unknown option $1 (use --device cuda|cpu, --out DIR, --budget SECONDS, --official PATH)" >&2; exit 2 ;;
  esac
done
PY=${PY:-$(command -v python || command -v python3)}
SLOW=1; [[ $D == cpu ]] && SLOW=5 && export OMP_NUM_THREADS=1   # dry mode: a CPU takes longer for the same steps
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
rm -rf "$OUT"; mkdir -p "$OUT"; W=$OUT/runs; mkdir -p "$W"; S=$OUT/summary.txt
END=$(( $(date +%s) + BUDGET )); exec > >(tee -a "$OUT/log.txt") 2>&1
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"     # one rank: NCCL on a GPU, gloo on the CPU

step() {   # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left); record exit status and seconds
  local name=$1 limit=$(( $2 * SLOW )) t0=$SECONDS left; shift 2; left=$(( END - $(date +%s) )); (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "$name SKIPPED (out of time)" | tee -a "$S"; return 1; fi
  echo "=== $name (${limit}s): $*"
  timeout -k 5 "$limit" "$@"; local rc=$?
  echo "$name rc=$rc $(( SECONDS - t0 ))s" | tee -a "$S"; return $rc
}
figures() {   # figures RUN_DIR LABEL: img/s, TFLOP/s per GPU and MFU of every tick, peak memory, non-finite steps
  "$PY" - "$1" "$2" <<'EOF' | tee -a "$S"
import json, sys
ticks = [json.loads(line) for line in open(sys.argv[1] + "/stats.jsonl")]
mfu = [f"{t['mfu']:.1%}" for t in ticks if "mfu" in t]
print(f"  {sys.argv[2]}: img/s per tick {[round(t['images_per_sec']) for t in ticks]}, TFLOP/s/GPU "
      f"{[float(format(t['tflops_per_gpu'], '.3g')) for t in ticks]}, MFU {mfu or 'n/a'}, peak {ticks[-1]['memory_gb']:.1f} GB, "
      f"non-finite steps {ticks[-1]['nonfinite_grad_steps']}")
EOF
}
timed() {   # timed LABEL N step ...: N images / wall seconds of the step (process start-up included)
  local label=$1 n=$2 t0; shift 2; t0=$(date +%s.%N); "$@" || return $?
  "$PY" -c "import sys; print(f'  {sys.argv[1]}: {int(sys.argv[2]) / (float(sys.argv[4]) - float(sys.argv[3])):.1f} img/s "\
"(wall, start-up included)')" "$label" "$n" "$t0" "$(date +%s.%N)" | tee -a "$S"
}

# Sizes: the real ones on a GPU; tiny ones in the dry mode, which only proves that every step runs.
if [[ $D == cpu ]]; then
  TINY="--resolution 8 --cbase 8 --cres 1,2 --duration 0.000064 --tick 0.032 --snap 1 --batch 16"   # 4 steps
  STOP=0.032; C10="--resolution 16 --cbase 16 --blocks 1 --batch 16 --duration 0.000064 --tick 0.032 --snap 1"
  SEEDS=0-15; N=16; SUITE="-k networks"; COMPILE=""      # compiling on a CPU alone takes minutes
  BENCH="--batch 1 --pairs 1 --adm-channels 64"
else
  TINY="--duration 0.004096 --tick 1.024 --snap 4.096"                                  # 128 steps of 32
  STOP=2.048; C10="--resolution 32 --batch 512 --batch-gpu ${BATCH_GPU:-128} --duration 0.01024 --tick 2.56 --snap 10.24"   # 20 steps
  SEEDS=0-1023; N=1024; SUITE=""; COMPILE="--compile"
  BENCH=""                                                # DDPM++ batch 128, ADM batch 32; 8 pairs each
fi
B="$PY tools/bench_official.py --device $D $BENCH"

T="07_train_cifar10.py --preset tiny --augment 0.12 --device $D $TINY"
C="07_train_cifar10.py --preset cifar10 --data shapes --cond --device $D $C10"

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
  torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$S"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$S"

# 1. The suite's device tests (tests/test_device.py through EDM_TEST_DEVICE; pytest may be missing on a GPU box).
if "$PY" -c "import pytest" 2>/dev/null; then
  step device-tests 150 env EDM_TEST_DEVICE=$D "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_device.py $SUITE
else echo "device-tests SKIPPED (pytest is not installed)" | tee -a "$S"; fi

# 2. Step for step against the official code (issue 29): training step and sampling forward, DDPM++ and ADM, fp32.
step bench-official 150 $B ${OFFICIAL:+--official "$OFFICIAL"} && grep -h "ratio\|img/s" "$OUT/log.txt" | tail -4 >> "$S"

# 3. 07 --preset tiny with augmentation in each precision, under torchrun (NCCL on a GPU), stop + resume + compile.
for p in fp32 bf16 fp16; do step tiny-$p 60 "$PY" $T --precision $p --outdir "$W/tiny-$p" && figures "$W/tiny-$p" tiny-$p; done
step tiny-bf16-torchrun 60 $RUN $T --precision bf16 --outdir "$W/tiny-torchrun" && figures "$W/tiny-torchrun" tiny-torchrun
step tiny-stop 45 "$PY" $T --precision bf16 --stop-kimg $STOP --outdir "$W/tiny-resume"
step tiny-resume-compile 150 "$PY" $T --precision bf16 $COMPILE --resume auto --outdir "$W/tiny-resume" \
  && figures "$W/tiny-resume" tiny-resume-compile

# 4. The paper's CIFAR-10 DDPM++ (full size) on synthetic 32x32 shapes: throughput and MFU per precision.
for p in fp32 bf16 fp16; do
  step c10-$p 100 "$PY" $C --augment 0 --precision $p --outdir "$W/c10-$p" && figures "$W/c10-$p" c10-$p
done
step c10-bf16-channels-last 100 "$PY" $C --augment 0 --precision bf16 --channels-last --outdir "$W/c10-bf16-cl" \
  && figures "$W/c10-bf16-cl" c10-bf16-channels-last
step c10-bf16-augment 100 "$PY" $C --precision bf16 --outdir "$W/c10-bf16-aug" && figures "$W/c10-bf16-aug" c10-bf16-augment
step c10-fp32-tf32 100 "$PY" $C --augment 0 --tf32 --outdir "$W/c10-tf32" && figures "$W/c10-tf32" c10-fp32-tf32

# 5. 08 under torchrun: generate, reference statistics of those images, the fid protocol (stand-in detector).
NET=$(ls "$W"/tiny-fp32/network-snapshot-*.pt 2>/dev/null | tail -1)
"$PY" tools/standin_detector.py "$W/detector.pt"
G="08_evaluate_fid.py"
if [[ -n $NET ]]; then
  timed 08-generate $N step gen-torchrun 90 $RUN $G generate --network "$NET" --seeds $SEEDS --batch 256 \
    --outdir "$W/gen" --device $D
  timed 08-ref $N step ref-torchrun 60 $RUN $G ref --data "$W/gen" --dest "$W/ref.npz" --detector "$W/detector.pt" \
    --device $D
  timed 08-fid $N step fid-torchrun 90 $RUN $G fid --network "$NET" --ref "$W/ref.npz" -n $N --repeats 1 \
    --detector "$W/detector.pt" --outdir "$W/fid" --device $D
else echo "08 steps SKIPPED (tiny-fp32 left no snapshot)" | tee -a "$S"; fi

# 6. What this project's options buy over its own plain fp32 step (paired, as step 2), then, last as the slowest,
# compiled CIFAR-10 DDPM++ in bf16.
for o in channels-last bf16; do
  step bench-$o 90 $B --configs ddpmpp --compare $o && grep -h "ratio" "$OUT/log.txt" | tail -2 >> "$S"
done
step c10-bf16-compile 170 "$PY" $C --augment 0 --precision bf16 $COMPILE --outdir "$W/c10-bf16c" \
  && figures "$W/c10-bf16c" c10-bf16-compile

tar czf "$OUT/runs.tgz" -C "$W" --exclude='*.pt' --exclude='*.npz' --exclude='*.png' . 2>/dev/null
echo; echo "summary ($S):"; cat "$S"
