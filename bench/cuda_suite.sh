#!/usr/bin/env bash
# The CUDA halves of the benchmarks, in one go on a lent GPU machine that has torch but no registry access: wheels
# for the other pinned packages come in .whl/, the embedded model's config and tokenizer in .gpu/smollm2 (made here
# with `bench/stand_in_model.py --pack .gpu/smollm2`), and the model gets random weights there (see that script).
#     bash bench/cuda_suite.sh OUT_DIR [parts...]
#     parts: smoke tests groups profile throughput memory compare (default: all)
set -u
out=${1:?OUT_DIR}; shift
parts=${*:-smoke tests groups profile throughput memory compare}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WORKBENCH_MODELS_DIR=/tmp/wb-models WORKBENCH_WORKSPACE=/tmp/wb-ws
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers, peft, bitsandbytes, trl, datasets, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__, "trl", trl.__version__, "accelerate", accelerate.__version__)'
  python3 bench/stand_in_model.py --source .gpu/smollm2 --models-dir "$WORKBENCH_MODELS_DIR"; } 2>&1 | tee "$out/setup.log"

for part in $parts; do
  start=$(date +%s)
  case $part in
    smoke) timeout 150 python3 launch.py train --preset quick-demo --workspace "$WORKBENCH_WORKSPACE" --max-steps 30 ;;
    tests) timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_train.py tests/test_lora_groups.py ;;
    groups) timeout 90 python3 bench/lora_groups_speed.py --steps 10 ;;
    profile) timeout 120 python3 bench/step_profile.py --steps 10 --precision bf16-mixed ;;
    throughput) timeout 300 python3 bench/train_throughput.py --rows ${ROWS:-512} --rounds 2 ;;
    memory) timeout 270 python3 bench/memory_calibration.py --device cuda ;;
    compare) timeout 120 python3 bench/compare_generation.py --tokens 64 --rounds 3 ;;
  esac > "$out/$part.log" 2>&1
  echo "== $part: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/summary.log"
done
