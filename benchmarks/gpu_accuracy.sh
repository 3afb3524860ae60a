#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install ftplan with the training extra, run the CUDA accuracy
# matrix at full depth, and write benchmarks/ACCURACY-GPU.md. Meant to finish in under 8 minutes
# on an H100/H200; pass a substring to run fewer cases (e.g. `qlora`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, peft, bitsandbytes" 2>/dev/null; then
    "$PY" -m pip install --quiet -e '.[train]'
else
    "$PY" -m pip install --quiet --no-deps -e .
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1
"$PY" benchmarks/accuracy.py --device cuda ${1:+--only "$1"}
