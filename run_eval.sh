#!/usr/bin/env bash
# Evaluate CvT-13 (224x224) weights on the ImageNet val set on one GPU.
# Change the settings below, or set them in the environment; PRETRAINED is a
# weights file (.pdparams may be omitted) or released weights by name (cvt-13-224:
# fetched and converted on first use). Extra arguments go to main_single_gpu.py.
CONFIG=${CONFIG:-./configs/cvt-13-224x224.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
PRETRAINED=${PRETRAINED:-cvt-13-224}
OUTPUT=${OUTPUT:-./output/eval}
BATCH_SIZE=${BATCH_SIZE:-64}
GPUS=${GPUS:-0}

set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

CUDA_VISIBLE_DEVICES=$GPUS "$PYTHON" main_single_gpu.py \
  -cfg "$CONFIG" \
  -dataset imagenet2012 \
  -batch_size "$BATCH_SIZE" \
  -data_path "$DATA_PATH" \
  -output "$OUTPUT" \
  -eval \
  -pretrained "$PRETRAINED" \
  "$@"
