#!/usr/bin/env bash
# The benchmark suite on a GPU, in one short run (issue 17's GPU checks): the GPU tests, the
# step-time ratios of benchmarks/step_overhead.py (demo MLP, and a large MLP) and
# benchmarks/real_models.py, and benchmarks/converted_inference.py; each stage under its own time
# limit, its log under $OUT (default ./gpu_out). DEVICE=cpu QUICK=1 dry-runs it on the CPU.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU
#
# On this workplace's device machine (torch 2.11, no torchao / mnist1d, no network), carry wheels: here,
#   echo /.whl/ >> .git/info/exclude; echo /.whl17/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform any"
#   python3 -m pip download -q $P -d .whl torchao==0.18.0 mnist1d==0.0.2.post1; python3 -m pip download -q $P -d .whl17 torchao==0.17.0
# then run (carry .whl and .whl17), torchao 0.17 where 0.18 does not import beside that torch:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site;
#   python3 -c "from torchao.quantization.qat import QATConfig" || { python3 -m pip install -q --no-index --no-deps
#   --target /tmp/site17 .whl17/*.whl; export PYTHONPATH=$PWD:/tmp/site17:/tmp/site; }; OUT=$OUT bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false QAT_LIGHTNING_CACHE=${QAT_LIGHTNING_CACHE:-/tmp/qat_cache}
if [ "${QUICK:-0}" = 1 ]; then S="--steps 10 --warmup 3 --rounds 1"; R="--steps 5 --warmup 3 --rounds 1 --models gpt2 resnet"; N=3
else S="--steps 200 --warmup 20 --rounds 2"; R="--steps 40 --warmup 10 --rounds 2"; N=20; fi
filter() { grep -v -e '^W[0-9]\{4\} ' -e 'Failed to load' -e 'register_constant' ; }
stage() {  # stage NAME SECONDS COMMAND...: one stage, its log in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | filter | tee "$OUT/$name.log" | tail -n 40
    echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - start)) s"
}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
$PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -n 1

MLP_VARIANTS="diffq ema diffq_ema int4_g32 int8tok_int4_g32 torch_ao torchao_int4_g32 torchao_int8tok_int4_g32 lsq_w4 diffq_sym_ste_damp"
[ "$DEVICE" = cuda ] && stage gpu_tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
stage mlp 150 $PY benchmarks/step_overhead.py --device "$DEVICE" $S --variants $MLP_VARIANTS --json "$OUT/mlp.json"
[ "$DEVICE" = cuda ] && stage syncs 60 $PY benchmarks/gpu_syncs.py
stage real_models 200 $PY benchmarks/real_models.py --device "$DEVICE" $R --json "$OUT/real_models.json"
stage converted 60 $PY benchmarks/converted_inference.py --device "$DEVICE" --repeats $N
[ "$DEVICE" = cuda ] && stage converted_large 60 $PY benchmarks/converted_inference.py --device "$DEVICE" --repeats $N --hidden 2048 --layers 4
stage mlp_large 90 $PY benchmarks/step_overhead.py --device "$DEVICE" $S --hidden 4096 4096 --batch-size 1000 \
    --variants diffq ema int4_g32 torchao_int4_g32 --json "$OUT/mlp_large.json"
[ "$DEVICE" = cuda ] && stage compile 100 $PY benchmarks/real_models.py --device "$DEVICE" --steps 40 --warmup 10 --rounds 1 \
    --models llama --variants diffq int4_g16_int8tok --compile --json "$OUT/compile.json"
