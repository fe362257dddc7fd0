#!/usr/bin/env bash
# Evaluate CvT-13 (224x224) weights on the ImageNet val set with one process
# per GPU; every val image is counted once. Change the settings below, or set
# them in the environment (PRETRAINED: a weights file, or released weights by
# name); extra arguments go to main_multi_gpu.py.
CONFIG=${CONFIG:-./configs/cvt-13-224x224.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
PRETRAINED=${PRETRAINED:-cvt-13-224}
OUTPUT=${OUTPUT:-./output/eval-multi}
BATCH_SIZE=${BATCH_SIZE:-64}
GPUS=${GPUS:-0,1,2,3}

set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

CUDA_VISIBLE_DEVICES=$GPUS "$PYTHON" main_multi_gpu.py \
  -cfg "$CONFIG" \
  -dataset imagenet2012 \
  -batch_size "$BATCH_SIZE" \
  -data_path "$DATA_PATH" \
  -output "$OUTPUT" \
  -eval \
  -pretrained "$PRETRAINED" \
  "$@"
