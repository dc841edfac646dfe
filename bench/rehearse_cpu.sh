#!/usr/bin/env bash
# The rehearsal of search_spaces/qadapter.yaml on a CPU machine without network (docs/benchmarks.md):
# CLIP ViT-B/16 + GPT-2 124M with random weights, 8 frames at 224 px, on a synthetic dataset in MSR-VTT's layout.
#
#   QSTUDY_HOME=/tmp/qs bench/rehearse_cpu.sh
#
# Offline, the models' config.json come from transformers' config classes with the published shapes
# (CLIPVisionConfig(patch_size=16), GPT2Config(): width, depth, heads, patch, vocabulary and activations as the
# hub's files give them), written where `--model-configs` reads them. With the hub in reach, leave out
# --model-configs: the rehearsal reads the hub's config.json files (only those). The estimate is for MSR-VTT's
# train (6,513) and validate (497) splits. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
home=${QSTUDY_HOME:?set QSTUDY_HOME: the synthetic MSR-VTT data goes to \$QSTUDY_HOME/data/msrvtt}
configs="$home/model-configs"

if [[ ! -f "$home/data/msrvtt/train_val_videodatainfo.json" ]]; then
    "$python" -m qstudy.cli data synthetic --layout msrvtt --clips 120 --out "$home/data/msrvtt"
fi
"$python" - "$configs" <<'PY'
import sys
from pathlib import Path

from transformers import CLIPVisionConfig, GPT2Config

root = Path(sys.argv[1])
CLIPVisionConfig(patch_size=16).save_pretrained(root / "openai" / "clip-vit-base-patch16")
GPT2Config().save_pretrained(root / "openai-community" / "gpt2")
PY
"$python" -m qstudy.cli rehearse search_spaces/qadapter.yaml --model-configs "$configs" \
    --train-clips 6513 --val-clips 497 "$@"
