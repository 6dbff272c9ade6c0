#!/usr/bin/env bash
# The GPU checks in one run (a CUDA machine with torch; nothing else installed, nothing
# downloaded): the GPU tests, the pipeline's own commands on --device $dev, and the
# benchmarks with --device $dev. Each step has its own time limit, so one failure leaves
# the others' figures. Output: stdout and, when OUT is set, one file per step under it.
#
#     bash benchmarks/gpu_checks.sh            # ~7 minutes on an H200
#     DEVICE=cpu SMOKE=1 bash benchmarks/gpu_checks.sh   # a dry run of every step, tiny sizes
set -u
dev=${DEVICE:-cuda}
smoke=${SMOKE:-0}
params=params.yaml; tiny=(); batch=128
if [ "$smoke" = 1 ]; then
    params=params.smoke.yaml
    tiny=(--step-steps 1); batch=8
fi
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONPATH=$PWD
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
itm() { python3 -c 'import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))' "$@"; }
step() {  # step NAME SECONDS COMMAND...: run it, keep its output, report its status
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.txt"
    echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}

[ "$dev" = cpu ] || nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'

step gpu_tests 240 python3 -m pytest -q -o addopts= -p no:cacheprovider -m gpu -rs \
    tests/test_model_contract.py tests/test_models.py tests/test_training.py tests/test_knn.py

# the pipeline's commands on the GPU, embedded data at the default params' sizes
step pipeline_cuda 150 bash -c "
  set -e
  $(declare -f itm)
  itm prepare-data --params $params --out $work/data
  time itm train --params $params --section train_base --data $work/data --out $work/base --device $dev --quiet
  time itm embed --checkpoint $work/base/checkpoint --data $work/data --out $work/emb --device $dev --quiet
  time itm mine-candidates --embeddings-dir $work/emb --out $work/cand --device $dev --precision bf16 --k-i2t 100 --k-t2i 20
  time itm evaluate --checkpoint $work/base/checkpoint --data $work/data --device $dev --quiet"

# training steps (reference widths, new models): triplet, AOQ batched, AOQ three passes
cat > "$work/params.yaml" <<EOF
finetune:
  data: $work/data
  candidates: $work/cand
  models:
    vse_inf: {train: {batch_size: $batch}}
    vsrn: {train: {batch_size: $batch}}
    bfan: {train: {batch_size: $batch}}
    sgr: {train: {batch_size: $batch}}
EOF
step train_steps_cuda 150 python3 benchmarks/aoq_ablation.py --params "$work/params.yaml" \
    --steps-only --device $dev --models vse_inf vsrn bfan sgr --init vse_inf=scratch \
    --init vsrn=scratch --init bfan=scratch --init sgr=scratch --out "$work/steps" "${tiny[@]}"

if [ "$smoke" = 1 ]; then
    step cross_scoring_cuda 60 python3 benchmarks/cross_scoring.py --device $dev --shard 8 \
        --loop-captions 2 --repeats 1 --embed 32
    step mining_cuda 60 python3 benchmarks/mining.py --device $dev --backends torch,reference \
        --n-img 500 --dim 32 --k-i2t 20 --k-t2i 5 --json "$out/mining_cuda.json"
else
    step cross_scoring_cuda 120 python3 benchmarks/cross_scoring.py --device $dev
    step cross_scoring_cuda_1024 120 python3 benchmarks/cross_scoring.py --device $dev --embed 1024 \
        --shard 256 --loop-captions 64
    step mining_cuda 200 python3 benchmarks/mining.py --device $dev --backends torch,reference \
        --json "$out/mining_cuda.json"
fi
echo "=== done"
