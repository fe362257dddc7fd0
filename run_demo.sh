#!/usr/bin/env bash
# The built-in demo: no ImageNet needed. Sets up ./.venv, generates a small
# ImageNet-format data set of 10 drawn pattern classes (demo_data/), trains a
# small CvT on it with the real engine and recipe augmentations (run_train.sh),
# evaluates the last checkpoint (run_eval.sh -eval -pretrained) and prints its
# accuracy. A few minutes on 2 CPU cores; a GPU is used when there is one.
DEMO_DATA=${DEMO_DATA:-./demo_data}
OUTPUT=${OUTPUT:-./output/demo}

set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

bash tools/setup_env.sh
if [ ! -f "$DEMO_DATA/LOC_synset_mapping.txt" ]; then
  .venv/bin/python tools/make_demo_data.py -output "$DEMO_DATA"
fi

echo "== Training (log: $OUTPUT/log.txt)"
CONFIG=./configs/cvt-demo.yaml DATA_PATH="$DEMO_DATA" OUTPUT="$OUTPUT" BATCH_SIZE=32 \
  bash run_train.sh

# the last epoch's weights (not the -EMA ones)
checkpoint=$(ls "$OUTPUT"/CvT-Epoch-*-Loss-*.pdparams | grep -v -- '-EMA\.pdparams$' | sort -V | tail -n 1)
echo "== Evaluating $checkpoint"
CONFIG=./configs/cvt-demo.yaml DATA_PATH="$DEMO_DATA" OUTPUT="$OUTPUT/eval" BATCH_SIZE=100 \
  PRETRAINED="$checkpoint" bash run_eval.sh

result=$(grep -o 'Validation Acc@1: [0-9.]*' "$OUTPUT/eval/log.txt" | tail -n 1 | awk '{print $3}')
echo "== Demo done in $(( $(date +%s) - start )) s: top-1 accuracy $result on the 300 val images" \
  "(10 classes: chance is 0.10)"
