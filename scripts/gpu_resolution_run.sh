#!/usr/bin/env bash
# The shipped bundled model's recipe (scripts/train_bundled_model.sh step 9) at a higher input resolution, on one
# CUDA GPU, beside the same steps at 256 px as the control. Each variant:
#   1. continues the shipped model's encoder pretraining (scripts/pretrain_synth_encoder.py, reading objective, a
#      new head for the RES/64 x RES/64 grid, --head-steps 50) for the same number of steps at its resolution;
#   2. stage 1 (3,600 steps of 128, encoder frozen) on the training split plus its moved pair questions;
#   3. stage 2 (800 steps of 32, seed 44) on those plus 20,000 more scenes (seed 1) and their moved pairs;
#   4. evaluates the validation and test splits.
# The data stay 256 px images: a 512 px model sees them upsampled, so the test split is the shipped model's.
# Run from the repository root:
#
#   OUT=runs/gpu-res bash scripts/gpu_resolution_run.sh          # variants enc512 and enc256
#   TINY=1 OUT=/tmp/gpu-res-tiny bash scripts/gpu_resolution_run.sh   # the same steps at toy sizes, on the CPU
#
# VARIANTS picks among enc512, enc256, enc384 and s128 (default "enc512 enc256"); PRE_STEPS (600) and PRE_S (75) bound
# the encoder's continued pretraining in steps and seconds (the fewer wins; the log records steps_run).
# s128 is 512 px with a sixth encoder stage (scripts/add_encoder_stage.py): stride 128, so 16 tokens as at 256 px. Its
# encoder starts from S128_FROM (default runs/res512/encoder-enc512.safetensors when it exists, else the shipped
# model's encoder) with the new stage at its initialisation. GPU_TESTS=0 skips the CUDA tests run beside the training.
# TOKENIZER (default the data's own, trained by `fastvlm data tokenizer`) names the tokenizer folder; the shipped
# model's is runs/bundled/data/tokenizer. Everything is bounded by DEADLINE seconds from the start (default 555):
# a step that would pass it is stopped, and stage 2 stops early enough to leave its evaluation time. OUT receives
# logs.tgz (logs, metrics, eval summaries and predictions) and per variant its encoder, final models, eval summaries and
# predictions. W (default 7) is the number of image-decoding workers per variant.
set -u -o pipefail
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_resolution_run.sh takes no arguments (settings are environment variables; see --help)" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/gpu-res}
WORK=${WORK:-/tmp/fastvlm-res}
TINY=${TINY:-0}
DEADLINE=${DEADLINE:-555}
VARIANTS=${VARIANTS:-enc512 enc256}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
lim() { local t=$(( $(left) - ${1:-0} )); [ $t -lt 1 ] && t=1; echo $t; }  # a timeout of 0 would mean none
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
PY=${PY:-python3}
FV="$PY -m fastvlm.cli"
SHIPPED=fastvlm/assets/fastvlm-synth

if [ "$TINY" = 1 ]; then
  NTRAIN=96 NVAL=16 NTEST=24 NREAD=32 PRE_STEPS=3 PRE_S=60 S1=3 S2=3 DEV=cpu W=2 BS=8 B1=8 B2=4 HEAD=1
else
  NTRAIN=20000 NVAL=500 NTEST=1000 NREAD=20000 PRE_STEPS=${PRE_STEPS:-600} PRE_S=${PRE_S:-75} S1=3600 S2=800
  DEV=cuda W=${W:-7} BS=128 B1=128 B2=32 HEAD=50
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
if [ "$TINY" != 1 ] && [ "${GPU_TESTS:-1}" = 1 ]; then  # the CUDA checks, beside the training
  ( timeout 150 $PY -m pytest tests/test_fast_paths.py -q -k cuda -p no:cacheprovider
    timeout 150 $PY -m pytest -m slow tests/test_train_gpu.py -q -p no:cacheprovider ) > "$WORK/gpu-tests.log" 2>&1 &
fi

D=$WORK/data
rm -f "$D/.moved-ready"
log "data"
$FV data synth --out "$D" --num-train $NTRAIN --num-val $NVAL --num-test $NTEST --image-size 256 --level basic \
  --train-turns 7 --seed 0 --workers $W --no-progress --overwrite > "$WORK/data.log" 2>&1 &
p1=$!
$FV data synth --out "$D/extra" --num-train $NTRAIN --num-val 0 --num-test 0 --image-size 256 --level basic \
  --train-turns 7 --seed 1 --workers $W --no-progress --overwrite > "$WORK/data-extra.log" 2>&1 &
p2=$!
wait $p1 $p2  # not the CUDA tests (a plain wait cost the session 17 run 60 s here)
if [ -n "${TOKENIZER:-}" ]; then cp -r "$TOKENIZER" "$D/tokenizer"; else $FV data tokenizer "$D" --out "$D/tokenizer" --vocab-size 512; fi
# the moved pair questions are needed from stage 1 on: they are made while the encoders train
(
  $PY scripts/moved_pair_split.py --data "$D" --split train --out "$D/moved-train.json" > "$WORK/moved.log" 2>&1 &
  $PY scripts/moved_pair_split.py --data "$D/extra" --split train --out "$D/extra/moved-train.json" \
    > "$WORK/moved-extra.log" 2>&1 &
  wait
  for S in train moved-train; do
    $PY scripts/prefix_image_paths.py "$D/extra/$S.json" "$D/extra-$S.json" --prefix extra/ || exit 1
  done
  sha256sum "$D"/{train,val,test,moved-train,extra-train,extra-moved-train}.json "$D"/tokenizer/tokenizer.json \
    > "$WORK/data-sha256.txt"
  touch "$D/.moved-ready"
  log "moved pairs ready"
) &

base=(--set tokenizer="$D/tokenizer" --set data.val="$D/val.json" --set data.image_folder="$D")
data1=(--set "data.train=[$D/train.json,$D/moved-train.json]")
data2=(--set "data.train=[$D/train.json,$D/moved-train.json,$D/extra-train.json,$D/extra-moved-train.json]")

# variant NAME RES INIT [ENCODER SETTINGS...]: INIT is the encoder to continue; the settings (--set init.vision.X=...)
# describe it when it is not the shipped model's five stages. Each result is copied to OUT as soon as it exists, so a
# run stopped at the device's time limit still returns what it finished.
variant() {
  local name=$1 res=$2 init=$3 o="$WORK/$1"
  shift 3
  local vsets=("$@")
  mkdir -p "$o"
  log "$name: encoder at $res px"
  timeout $(lim) $PY scripts/pretrain_synth_encoder.py --data "$D" --image-size $res --device $DEV --workers $W \
    --objective reading --reading-images $NREAD --batch-size $BS --steps $PRE_STEPS --max-seconds $PRE_S \
    --head-steps $HEAD --lr 1e-3 --seed 1 --bf16 --set init.vision_tower="$init" "${vsets[@]}" \
    --set init.vision.inference_mode=true --out "$o/encoder.safetensors" > "$o/encoder.log" 2>&1 \
    || { log "$name: encoder failed"; tail -5 "$o/encoder.log"; return; }
  cp "$o/encoder.safetensors" "$OUT/encoder-$name.safetensors"
  while [ ! -f "$D/.moved-ready" ]; do
    [ "$(left)" -gt 0 ] || { log "$name: no moved pairs in time"; return; }
    sleep 1
  done
  log "$name: stage 1"
  timeout $(lim) $FV train synth_stage1 --output-dir "$o/stage1" "${base[@]}" "${data1[@]}" \
    --set data.image_size=$res --set init.vision.image_size=$res --set init.vision.inference_mode=true \
    --set init.vision_tower="$o/encoder.safetensors" "${vsets[@]}" --set train.seed=43 --set train.max_steps=$S1 \
    --set train.per_device_batch_size=$B1 --set data.num_workers=$W --set output.save_every=1200 \
    --set output.eval_every=600 --no-progress > "$o/stage1.log" 2>&1 \
    || { log "$name: stage 1 failed"; tail -5 "$o/stage1.log"; return; }
  tar czf "$OUT/model-$name-stage1.tgz" -C "$o/stage1" final
  log "$name: stage 2"
  timeout $(lim 45) $FV train synth_stage2 --output-dir "$o/stage2" "${base[@]}" "${data2[@]}" \
    --set model="$o/stage1/final" --set train.seed=44 --set train.max_steps=$S2 --set train.per_device_batch_size=$B2 \
    --set data.num_workers=4 --set output.save_every=400 --set output.eval_every=200 --no-progress \
    > "$o/stage2.log" 2>&1 || { log "$name: stage 2 failed"; tail -5 "$o/stage2.log"; }
  [ -d "$o/stage2/final" ] && tar czf "$OUT/model-$name-stage2.tgz" -C "$o/stage2" final
  for st in stage2 stage1; do
    [ -d "$o/$st/final" ] || continue
    for split in val test; do
      log "$name: eval $st $split"
      timeout $(lim) $FV eval --model "$o/$st/final" --task synth --data "$D/$split.json" --out "$o/eval-$st-$split" \
        --dtype fp32 --device $DEV --batch-size 64 > "$o/eval-$st-$split.log" 2>&1 \
        && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['scores']['accuracy'],
{k: round(v['accuracy'], 3) for k, v in d['breakdown']['question_type'].items()})" \
          "$o/eval-$st-$split/summary.json" "$name $st $split" \
        && cp "$o/eval-$st-$split/summary.json" "$OUT/eval-$name-$st-$split.json" \
        && cp "$o/eval-$st-$split/predictions.jsonl" "$OUT/predictions-$name-$st-$split.jsonl"
    done
  done
  rm -rf "$o"/stage1/step_* "$o"/stage2/step_*
}

S128_FROM=${S128_FROM:-runs/res512/encoder-enc512.safetensors}
[ -f "$S128_FROM" ] || S128_FROM=$SHIPPED/model.safetensors
s128() {
  $PY scripts/add_encoder_stage.py --encoder "$S128_FROM" --config $SHIPPED/config.json --image-size 512 \
    --out "$WORK/s128-init.safetensors" > "$WORK/s128-init.log" 2>&1 || { log "s128: init failed"; return; }
  local sets  # the encoder's recipe settings, as the script prints them (an array: no word splitting or globbing)
  read -r -a sets <<< "$(sed -n 's/^recipe settings: //p' "$WORK/s128-init.log")"
  [ ${#sets[@]} -gt 0 ] || { log "s128: no recipe settings in s128-init.log"; return; }
  variant s128 512 "$WORK/s128-init.safetensors" "${sets[@]}"
}
for v in $VARIANTS; do
  case $v in
    enc512) variant enc512 512 $SHIPPED & ;;
    enc256) variant enc256 256 $SHIPPED & ;;
    enc384) variant enc384 384 $SHIPPED & ;;
    s128) s128 & ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
done
wait
log "variants done; packing"
cat "$WORK/data-sha256.txt" 2>/dev/null
cd "$WORK"
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude=data --exclude='step_*' .
ls -la "$OUT"
log "done"
