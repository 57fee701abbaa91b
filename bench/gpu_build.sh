#!/usr/bin/env bash
# The build benchmark on a GPU machine: a real open_clip CLIP (ViT-B-32) as the encoder, mixed
# precision, several embedding actors per GPU (fractional --num-gpus-per-actor). Run it where a
# GPU is lent (bench/README.md); it prints the stage times and writes bench/results/gpu_build.*.
#
#   bash bench/gpu_build.sh [LIMIT] [ACTORS_PER_GPU]
#
# Needs the ViT-B-32 weights on disk (open_clip pretrained tag or a local checkpoint in
# $GENIUS_CLIP_CHECKPOINT); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-70000}
PER_GPU=${2:-4}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/genius-gpu-build}
nvidia-smi --query-gpu=name,memory.total --format=csv
mkdir -p "$WORK"
# Stage-1 encoder folder for ViT-B-32 (mixed precision is open_clip's autocast on cuda).
$PY - "$WORK/encoder" <<'PYEOF'
import os, sys
from genius.encoders import EncoderConfig, MultimodalEncoder
cfg = EncoderConfig(model_name="ViT-B-32", pretrained=os.environ.get("GENIUS_CLIP_CHECKPOINT", "openai"),
                    device="cuda", batch_size=512)
MultimodalEncoder.from_config(cfg).save(sys.argv[1])
PYEOF
GPUS=$(nvidia-smi -L | wc -l)
$PY bench/build.py --limit "$LIMIT" --work "$WORK" --encoder "$WORK/encoder" --actors "$((GPUS * PER_GPU))" \
  --num-gpus-per-actor "$(python3 -c "print(1/$PER_GPU)")" --cpus-per-actor 2 --batch-size 512 --size paper \
  --train-workers "$GPUS" --out bench/results/gpu_build 2>&1 | tee bench/results/gpu_build.log
