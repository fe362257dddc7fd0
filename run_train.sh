#!/usr/bin/env bash
# Train CvT-13 (224x224) on ImageNet on one GPU, with the official recipe.
# Change the settings below, or set them in the environment
# (e.g. DATA_PATH=/data/imagenet bash run_train.sh); extra arguments go to
# main_single_gpu.py (e.g. -resume PATH, -overwrite, -amp, -pretrained PATH).
# Run again with the same settings, it continues the run in OUTPUT (-resume auto).
CONFIG=${CONFIG:-./configs/cvt-13-224x224.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
OUTPUT=${OUTPUT:-./output/train}
BATCH_SIZE=${BATCH_SIZE:-32}
GPUS=${GPUS:-0}

set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# run again, it continues where it stopped (or says it is finished), unless told otherwise
case " $* " in *" -resume "*|*" -overwrite "*) ;; *) set -- -resume auto "$@" ;; esac

CUDA_VISIBLE_DEVICES=$GPUS "$PYTHON" main_single_gpu.py \
  -cfg "$CONFIG" \
  -dataset imagenet2012 \
  -batch_size "$BATCH_SIZE" \
  -data_path "$DATA_PATH" \
  -output "$OUTPUT" \
  "$@"
