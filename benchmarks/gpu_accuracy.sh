#!/usr/bin/env bash
# The CUDA accuracy matrix (benchmarks/accuracy.py --device cuda): full depth, both training loops, every
# optimizer name, step times at three micro-batch sizes; writes benchmarks/ACCURACY-GPU.md and appends raw
# results to benchmarks/results/cuda.jsonl. Before it, benchmarks/lora_overhead.py times a PEFT LoRA layer
# against the frozen layer it wraps (the time model's LoRA miss). Meant to finish in under 9 minutes on an H200.
#
#   benchmarks/gpu_accuracy.sh [SUBSTRING]            the GPU run (SUBSTRING: only cases whose id has it)
#   benchmarks/gpu_accuracy.sh --device cpu [SUBSTR]  rehearsal on a CPU: every step below, the tiny matrix
#
# The GPU machine installs nothing from a registry and its python3 has torch, transformers, peft and
# accelerate but not pydantic or bitsandbytes (maybe not rich/pluggy/click either). So nothing is built: the
# missing packages come as wheels carried in .wheels/ (git-ignored), installed with --no-index --no-deps into
# a scratch folder that goes on PYTHONPATH together with a shim that makes the repository importable as
# `ftplan` (pyproject maps ftplan -> planner/, ftplan.backends -> plugins/, ftplan.catalogs -> catalogs/).
#
# Under the device tool, results go straight to $OUT (cuda.jsonl, ACCURACY-GPU.md, lora_overhead-cuda.jsonl):
# copy them to benchmarks/results/ and benchmarks/ here and commit.
#
# Getting the wheels, here, before the GPU session (the versions this repository is tested with; pure-Python
# wheels serve every Python; pydantic-core and bitsandbytes are binary: fetch pydantic-core for every CPython
# the GPU machine might have, pip picks the one that fits; bitsandbytes' wheel is ~43 MB, and everything
# carried, working tree included, must stay under 64 MiB):
#
#   V="pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
#      rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 pluggy==1.7.0 click==8.1.8"
#   pip download $V --no-deps -d .wheels
#   for py in 3.10 3.11 3.12 3.13; do
#     pip download pydantic-core==2.50.5 --no-deps --only-binary=:all: --python-version $py \
#         --platform manylinux2014_x86_64 -d .wheels
#   done
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d .wheels
#
# and carry it: run(command="benchmarks/gpu_accuracy.sh", carry=[".wheels"], timeout_s=540). Where the python
# has no pip, the wheels are unpacked instead (a wheel is a zip of the installed files; NO_PIP=1 forces this).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
ONLY=${1:-}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ftplan-gpu.XXXXXX")
DEPS=$SCRATCH/deps
SHIM=$SCRATCH/shim
step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "1. python"
"$PY" -c "import sys, torch, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

step "2. missing packages from .wheels (no index, no dependencies)"
# import name -> distribution name; only what this python lacks is installed, so its own versions stay
MISSING=()
for pair in pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types \
            typing_inspection:typing-inspection typing_extensions:typing-extensions rich:rich \
            markdown_it:markdown-it-py mdurl:mdurl pygments:pygments pluggy:pluggy click:click yaml:PyYAML \
            huggingface_hub:huggingface_hub bitsandbytes:bitsandbytes; do
    # the CPU rehearsal installs every carried package (its venv lacks none), so the install is exercised
    # (wheel file names spell a distribution with underscores)
    if [ "$DEVICE" = cpu ] && ls .wheels 2>/dev/null | grep -qi "^$(tr - _ <<<"${pair#*:}")-" \
        || ! "$PY" -c "import ${pair%%:*}" 2>/dev/null; then
        MISSING+=("${pair#*:}")
    fi
done
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "installing: ${MISSING[*]}"
    [ -d .wheels ] || { echo "no .wheels/ folder: download the wheels as this script's header says"; exit 2; }
    if "$PY" -m pip --version >/dev/null 2>&1 && [ -z "${NO_PIP:-}" ]; then
        # --target: a scratch folder, so an externally managed system python is left alone
        PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --no-index --no-deps --find-links .wheels \
            --target "$DEPS" "${MISSING[@]}"
    else  # no pip: a wheel is a zip of the installed files; take the one built for this python
        "$PY" - "$DEPS" "${MISSING[@]}" <<'EOF'
import pathlib, sys, zipfile
tag = "cp%d%d" % sys.version_info[:2]
for dist in sys.argv[2:]:
    stem = dist.replace("-", "_").lower()
    found = [w for w in pathlib.Path(".wheels").glob("*.whl") if w.name.lower().startswith(stem + "-")]
    fits = [w for w in found if "-py3-none-" in w.name or f"-{tag}-" in w.name]
    if not fits:
        sys.exit(f"no wheel of {dist} for {tag} in .wheels")
    zipfile.ZipFile(fits[0]).extractall(sys.argv[1])
    print("unpacked", fits[0].name)
EOF
    fi
else
    echo "nothing missing"
fi

step "3. ftplan from the working tree (no build)"
mkdir -p "$SHIM/ftplan"
ln -s "$REPO"/planner/* "$SHIM/ftplan/"
ln -s "$REPO/plugins" "$SHIM/ftplan/backends"
ln -s "$REPO/catalogs" "$SHIM/ftplan/catalogs"
export PYTHONPATH="$SHIM:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" - <<EOF
import ftplan, pydantic, pydantic_core, bitsandbytes, torch
where = {m.__name__: m.__file__ for m in (ftplan, pydantic, pydantic_core, bitsandbytes)}
print(where)
assert where["ftplan"].startswith("$SHIM"), "ftplan is not the working tree's"
EOF
"$PY" -m ftplan estimate qwen2.5-0.5b --method lora --device "$DEVICE" >/dev/null && echo "ftplan estimate: ok"

step "4. device"
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print(torch.cuda.get_device_name(), torch.version.cuda)"
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
    ARGS=(--device cuda --timeout 240)  # an 8B QLoRA build (random init, save, 4-bit reload) is the slowest
    if [ -n "${OUT:-}" ]; then  # the device tool's folder that comes back: results land there as they are made,
        # so a run stopped at its time limit still returns every finished case
        ARGS+=(--results "$OUT/cuda.jsonl" --out "$OUT/ACCURACY-GPU.md")
    fi
    LORA_ARGS=(--device cuda --results "${OUT:-benchmarks/results}/lora_overhead-cuda.jsonl")
else
    # the rehearsal: same runner and report, a tiny CPU matrix, written beside the real files
    ARGS=(--device cpu --matrix tiny --timeout 600 --results "$SCRATCH/tiny.jsonl" --out "$SCRATCH/ACCURACY-tiny.md")
    LORA_ARGS=(--device cpu --iterations 2 --results "$SCRATCH/lora_overhead-cpu.jsonl")
fi

step "5. the LoRA adapter path against the frozen layer (about a minute on an H100; first, as it is short)"
if [ -z "$ONLY" ]; then
    timeout 100 "$PY" benchmarks/lora_overhead.py "${LORA_ARGS[@]}" || echo "lora_overhead.py stopped: $?"
else
    echo "skipped: only the matrix's cases with '$ONLY'"
fi

step "6. the matrix (each case's result is written as it finishes)"
"$PY" benchmarks/accuracy.py "${ARGS[@]}" ${ONLY:+--only "$ONLY"}

step "7. done"
if [ "$DEVICE" = cuda ]; then cat "${OUT:-benchmarks}/ACCURACY-GPU.md"; else cat "$SCRATCH/ACCURACY-tiny.md"; fi
rm -rf "$SHIM"  # links into the repository; the deps and rehearsal results stay for a look
