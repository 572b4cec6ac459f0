# The second device call of session 17, on the same warm H200, right after scripts/gpu_resolution_run.sh (run.log)
# stopped at its deadline: evaluate the 256 px control's stage 1, and resume the 512 px stage 1 (which had not
# finished its feature cache). The stage 1 was stopped by its 165 s timeout after caching its features (93.2 s,
# stage1-enc512-second-call-timed-out.log) and had saved no checkpoint; the 512 px evaluations found no model.
W=/tmp/fastvlm-res; D=$W/data; o=$W/enc512; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ev() { timeout $4 python3 -m fastvlm.cli eval --model $W/$1/$2/final --task synth --data $D/$3.json \
  --out $W/$1/eval-$2-$3 --dtype fp32 --device cuda --batch-size 64 > $W/$1/eval-$2-$3.log 2>&1; }
(ev enc256 stage1 val 60; ev enc256 stage1 test 60) &
timeout 165 python3 -m fastvlm.cli train synth_stage1 --output-dir $o/stage1 --set tokenizer=$D/tokenizer \
  --set data.val=$D/val.json --set data.image_folder=$D --set "data.train=[$D/train.json,$D/moved-train.json]" \
  --set data.image_size=512 --set init.vision.image_size=512 --set init.vision.inference_mode=true \
  --set init.vision_tower=$o/encoder.safetensors --set train.seed=43 --set train.max_steps=3600 \
  --set train.per_device_batch_size=128 --set data.num_workers=7 --set output.save_every=1200 \
  --set output.eval_every=600 --no-progress > $o/stage1b.log 2>&1
ev enc512 stage1 val 25; ev enc512 stage1 test 30; wait
