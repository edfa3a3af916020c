#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go (OPT train step and MFU, its scanned and attention
# variants, beam search, conv VAE, discrete engine), each peer on the same GPU where it has one.
# Usage, on a GPU machine whose Python already has JAX (CUDA), PyTorch (CUDA), Flax, Optax and
# transformers:
#     OUT=some/dir bash benchmarks/gpu_suite.sh
# Every benchmark writes its own log under $OUT; one that fails or runs too long does not stop
# the others.
set -u
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
} 2>&1 | tee "$OUT/machine.log"
# ONLY=name1,name2 runs a subset.
ONLY=${ONLY:-}
run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "=== $name: $*" | tee "$OUT/$name.log"
  timeout "$limit" "$PY" "$@" 2>&1 | tee -a "$OUT/$name.log" | grep -v Warning
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
run opt_train_fp32 170 benchmarks/bench_opt_train.py --batch 32 --seq 512 --steps 10 --torch-device cuda --compare-scan
run opt_train_bf16 120 benchmarks/bench_opt_train.py --batch 32 --seq 512 --steps 10 --dtype bfloat16 --skip-torch --compare-scan
run opt_scan 200 benchmarks/opt_scan_ablation.py --variants unrolled,unrolled-cudnn,scanned-probs,scanned-cudnn-full
run opt_generate 110 benchmarks/bench_opt_generate.py --torch-device cuda --prompts 8
run vae 80 benchmarks/bench_vae.py --torch-device cuda --batch 256 --steps 50
run discrete 130 benchmarks/bench_discrete.py --chains 16384 --generations 1000 --steady-only
