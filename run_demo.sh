#!/usr/bin/env bash
# The built-in demo: no ImageNet, no download. Sets up ./.venv, generates a
# small ImageNet-format data set (demo_data/: 6 classes of two-shape scenes
# whose class is how a circle and a square are placed), trains a small CvT on
# it with the real engine, recipe and checkpoints (run_train.sh), evaluates the
# last checkpoint (run_eval.sh), prints the top-5 of a few val images
# (tools/predict.py) and draws the attention of one (tools/visualize_attention.py).
# About two minutes on 2 CPU cores; a GPU is used when there is one.
#   SEED=3 bash run_demo.sh       another training seed
DEMO_DATA=${DEMO_DATA:-./demo_data}
OUTPUT=${OUTPUT:-./output/demo}
SEED=${SEED:-0}

set -euo pipefail
cd "$(dirname "$0")"
start=$SECONDS

bash tools/setup_env.sh
PYTHON=.venv/bin/python
CONFIG=./configs/cvt-demo.yaml
# (re)generate unless the data of this demo version is there
if ! grep -qs '^n90000000 circle above square$' "$DEMO_DATA/LOC_synset_mapping.txt"; then
  if [ -f "$DEMO_DATA/LOC_synset_mapping.txt" ] && grep -q '^n9000000' "$DEMO_DATA/LOC_synset_mapping.txt"; then
    rm -rf "$DEMO_DATA/train" "$DEMO_DATA/val"  # an older demo's classes
  fi
  "$PYTHON" tools/make_demo_data.py -output "$DEMO_DATA"
fi

echo "== Training (SEED=$SEED)"
# each demo is a new run: -overwrite replaces the previous demo's checkpoints in $OUTPUT
CONFIG=$CONFIG DATA_PATH="$DEMO_DATA" OUTPUT="$OUTPUT" BATCH_SIZE=32 bash run_train.sh -overwrite -opts SEED "$SEED"

# the last epoch's weights (not the -EMA ones)
checkpoint=$(ls "$OUTPUT"/CvT-Epoch-*-Loss-*.pdparams | grep -v -- '-EMA\.pdparams$' | sort -V | tail -n 1)
echo "== Evaluating $checkpoint"
CONFIG=$CONFIG DATA_PATH="$DEMO_DATA" OUTPUT="$OUTPUT/eval" BATCH_SIZE=100 PRETRAINED="$checkpoint" \
  bash run_eval.sh

echo "== Top-5 of the first val image of three classes"
"$PYTHON" tools/predict.py -cfg "$CONFIG" -pretrained "$checkpoint" -labels "$DEMO_DATA/labels.txt" \
  "$DEMO_DATA"/val/n90000000/n90000000_val_00000.JPEG \
  "$DEMO_DATA"/val/n90000003/n90000003_val_00000.JPEG \
  "$DEMO_DATA"/val/n90000005/n90000005_val_00000.JPEG

"$PYTHON" tools/visualize_attention.py -cfg "$CONFIG" -pretrained "$checkpoint" -labels "$DEMO_DATA/labels.txt" \
  -image "$DEMO_DATA"/val/n90000000/n90000000_val_00000.JPEG -output "$OUTPUT/attention.png" > /dev/null

result=$(grep -o 'Validation Acc@1: [0-9.]*' "$OUTPUT/eval/log.txt" | tail -n 1 | awk '{print $3}')
echo "== Demo done in $((SECONDS - start)) s: top-1 accuracy $result on the 300 val images (6 classes: chance is 0.17)"
echo "   pictures: $OUTPUT/curves.png (training curves), $OUTPUT/attention.png (where the last block looks)"
