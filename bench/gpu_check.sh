#!/usr/bin/env bash
# GPU check: one paper-scale qadapter trial on one worker, then 2 workers x DeepSpeed ZeRO-2 in bf16
# (1 worker if the machine has one GPU), both through `qstudy train`; prints step time, peak GPU memory
# and samples/s of each. Paper scale: CLIP ViT-B/16 + GPT-2 124M from configs, 8 frames at 224 px, batch 2.
#
#   bench/gpu_check.sh                 # needs CUDA; fails without it
#   bench/gpu_check.sh --cpu-dry-run   # the same path on CPU: tiny preset, fp32, 2 ranks over gloo
#
# PYTHON picks the interpreter (default: python); WORK keeps the data, base and runs (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    preset=tiny precision=fp32 workers=2
    export CUDA_VISIBLE_DEVICES=""  # the dry run proves the path, so it must not find a GPU either
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--cpu-dry-run]" >&2; exit 2
else
    gpus=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    if [[ "$gpus" -lt 1 ]]; then
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); --cpu-dry-run tests the path on CPU" >&2
        exit 1
    fi
    preset=paper precision=bf16 workers=$(( gpus >= 2 ? 2 : 1 ))
fi

work=${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
echo "gpu_check: $preset preset, $precision, ZeRO-2 on $workers worker(s), work dir $work"
"$python" bench/gpu_check.py prepare "$preset" "$precision" "$workers" "$work"
"$python" -m qstudy.cli train "$work/single.yaml"
"$python" -m torch.distributed.run --nproc_per_node "$workers" -m qstudy.cli train "$work/zero2.yaml"
"$python" bench/gpu_check.py summary "$work/single.yaml:1" "$work/zero2.yaml:$workers"
