#!/usr/bin/env bash
# The bundled model's recipe on one CUDA GPU, several encoder pretrainings side by side, each followed by
# stage 1, stage 2 and the test-split eval (README, "The bundled model"). Run from the repository root:
#
#   OUT=runs/gpu-sweep bash scripts/gpu_bundled_sweep.sh
#   RES=128 STAGE2=0 VARIANTS="reading reading-seed1" OUT=runs/gpu-128 bash scripts/gpu_bundled_sweep.sh
#
# RES is the input resolution (the data stays 256 px), VARIANTS picks among binary, reading, reading-wide and
# reading-seed1 (default all four), STAGE2=0 stops after stage 1.
#
# The LM sweep: ENCODER=path skips the pretraining and gives every variant that (train-form) encoder, S1 sets
# stage 1's steps, and the lm* variants (which need ENCODER) change the LM's size and the stage seeds (docs/bundled-model.md, "The bundled model"):
#
#   ENCODER=.dev/r5/encoder-reading-seed1.safetensors S1=2400 STAGE2=0 \
#     VARIANTS="lm3 lm3-seed2 lm256x4 lm256x6 lm384x4" OUT=runs/gpu-lm bash scripts/gpu_bundled_sweep.sh
#
# Work happens in WORK (default /tmp/fastvlm-sweep); OUT receives a few files: logs.tgz (every log, metrics
# and eval summary), and per variant its encoder and its last final model (model-NAME.tgz: stage 2's, else
# stage 1's).
# Everything is bounded by DEADLINE seconds from the start (default 500), so whatever finished comes back
# even when a step is slower than planned. TINY=1 runs the same steps at toy sizes (a CPU smoke test).
set -u -o pipefail
OUT=${OUT:-runs/gpu-sweep}
WORK=${WORK:-/tmp/fastvlm-sweep}
TINY=${TINY:-0}
RES=${RES:-256}
STAGE2=${STAGE2:-1}
VARIANTS=${VARIANTS:-binary reading reading-wide reading-seed1}
DEADLINE=${DEADLINE:-500}
for v in $VARIANTS; do  # the LM variants start from a given encoder: they do not pretrain one
  case $v in lm*) [ -n "${ENCODER:-}" ] || { echo "variant $v needs ENCODER=path/to/encoder.safetensors"; exit 2; } ;; esac
done
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)  # packing runs from inside WORK
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
PY=${PY:-python3}
FV="$PY -m fastvlm.cli"

if [ "$TINY" = 1 ]; then
  NTRAIN=160 NVAL=16 NTEST=32 NREAD=64 PRE_S=5 S1=4 S2=4 DEV=cpu; SYNTH_WORKERS=2; VW=1; THREADS=1; BS=8
else
  NTRAIN=20000 NVAL=500 NTEST=1000 NREAD=20000 PRE_S=${PRE_S:-150} S1=${S1:-2400} S2=400 DEV=cuda; SYNTH_WORKERS=12
  VW=3; BS=128
  THREADS=3
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, accelerate, tokenizers, safetensors; print('torch', torch.__version__,
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"

if [ "$TINY" != 1 ]; then  # the CUDA checks, beside the training
  ( timeout 200 $PY -m pytest tests/test_fast_paths.py -q -k cuda -p no:cacheprovider
    timeout 200 $PY -m pytest -m slow tests/test_train_gpu.py -q -p no:cacheprovider ) > "$WORK/gpu-tests.log" 2>&1 &
fi

D=${DATA:-$WORK/data}
log "data"
$FV data synth --out "$D" --num-train $NTRAIN --num-val $NVAL --num-test $NTEST --image-size 256 --level basic \
  --train-turns 7 --seed 0 --workers $SYNTH_WORKERS --no-progress --overwrite | tee "$WORK/data.log"
# the shipped model's tokenizer when this checkout has it (the project's dev data), else the same command trains one
if [ -d .dev/basic256/tokenizer ]; then cp -r .dev/basic256/tokenizer "$D/"; else $FV data tokenizer "$D" --out "$D/tokenizer" --vocab-size 512; fi
sha256sum "$D"/{train,val,test}.json | tee -a "$WORK/data.log"

common=(--set tokenizer="$D/tokenizer" --set data.train="$D/train.json" --set data.val="$D/val.json"
        --set data.image_folder="$D")
size=(--set data.image_size=$RES --set init.vision.image_size=$RES)  # stage 1 only: stage 2 takes the model's

# variant NAME SEED "encoder flags" "recipe --set flags (encoder shape)" ["stage 1 --set flags (LM shape)"]
variant() {
  local name=$1 seed=$2 enc=$3 shape=$4 lm=${5:-} o="$WORK/$1"
  mkdir -p "$o"
  if [ -n "${ENCODER:-}" ]; then
    cp "$ENCODER" "$o/encoder.safetensors"
  else
    log "$name: encoder"
    OMP_NUM_THREADS=$THREADS timeout $(left) $PY scripts/pretrain_synth_encoder.py --data "$D" --image-size $RES \
      --device $DEV --workers $VW --max-seconds $PRE_S --steps ${STEPS:-20000} --batch-size $BS --seed $seed --lr 5e-3 \
      --set init.vision.layer_scale_init_value=0.01 $shape $enc --out "$o/encoder.safetensors" \
      > "$o/encoder.log" 2>&1 || { log "$name: encoder failed"; tail -5 "$o/encoder.log"; return; }
  fi
  log "$name: stage 1"
  OMP_NUM_THREADS=$THREADS timeout $(left) $FV train synth_stage1 --output-dir "$o/stage1" "${common[@]}" "${size[@]}" $shape $lm \
    --set init.vision_tower="$o/encoder.safetensors" --set train.max_steps=$S1 --set train.seed=$((42 + seed)) \
    --no-progress > "$o/stage1.log" 2>&1 || { log "$name: stage 1 failed"; tail -5 "$o/stage1.log"; return; }
  if [ "$STAGE2" = 1 ]; then
    log "$name: stage 2"
    OMP_NUM_THREADS=$THREADS timeout $(left) $FV train synth_stage2 --output-dir "$o/stage2" "${common[@]}" \
      --set model="$o/stage1/final" --set train.max_steps=$S2 --set train.seed=$((42 + seed)) --no-progress \
      > "$o/stage2.log" 2>&1 || { log "$name: stage 2 failed"; tail -5 "$o/stage2.log"; }
  fi
  for st in stage1 stage2; do
    [ -d "$o/$st/final" ] || continue
    log "$name: eval $st"
    OMP_NUM_THREADS=$THREADS timeout $(left) $FV eval --model "$o/$st/final" --task synth --data "$D/test.json" \
      --out "$o/eval-$st" --dtype fp32 --device $DEV --batch-size 64 > "$o/eval-$st.log" 2>&1 \
      && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['scores']['accuracy'],
{k: round(v['accuracy'], 3) for k, v in d['breakdown']['question_type'].items()})" "$o/eval-$st/summary.json" "$name $st"
  done
  # the intermediate checkpoints (weights and optimizer state) are not needed once the final models exist
  rm -rf "$o"/stage1/step_* "$o"/stage2/step_*
}

WIDE="--set init.vision.embed_dims=[48,96,192,192,384]"
# lm HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE: stage 1 flags for a Qwen2 LM of that shape
lm() {
  echo "--set init.text.hidden_size=$1 --set init.text.num_hidden_layers=$2 --set init.text.max_window_layers=$2" \
    "--set init.text.num_attention_heads=$3 --set init.text.num_key_value_heads=$4 --set init.text.intermediate_size=$5"
}
READING="--objective reading --reading-images $NREAD"
for v in $VARIANTS; do
  case $v in
    binary) variant binary 0 "" "" & ;;
    reading) variant reading 0 "$READING" "" & ;;
    reading-wide) variant reading-wide 0 "$READING" "$WIDE" & ;;
    reading-seed1) variant reading-seed1 1 "$READING" "" & ;;
    # the LM sweep (with ENCODER): the shipped 3-layer, 192-wide LM at two seeds, then wider and deeper ones
    lm3) variant lm3 1 "" "" & ;;
    lm3-seed2) variant lm3-seed2 2 "" "" & ;;
    lm256x4) variant lm256x4 1 "" "" "$(lm 256 4 4 2 768)" & ;;
    lm256x6) variant lm256x6 1 "" "" "$(lm 256 6 4 2 768)" & ;;
    lm384x4) variant lm384x4 1 "" "" "$(lm 384 4 6 2 1024)" & ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
done
wait
log "variants done; packing"
cd "$WORK"
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude=data --exclude='step_*' .
[ -n "${ENCODER:-}" ] || for v in */encoder.safetensors; do cp "$v" "$OUT/encoder-${v%%/*}.safetensors"; done
for v in */; do
  v=${v%/}; [ -d "$v/stage1/final" ] || continue
  st=$([ -d "$v/stage2/final" ] && echo stage2 || echo stage1)
  tar czf "$OUT/model-$v.tgz" -C "$v/$st" final && echo "model-$v.tgz: $st"
done
ls -la "$OUT"
log "done"
