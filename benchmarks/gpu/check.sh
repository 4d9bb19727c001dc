#!/usr/bin/env bash
# The GPU checks of the ~3x recipe (issue 4) as one prepared command for a lent GPU machine.
#
# Here, once:  make gpu-wheels        (the packages that machine lacks, as wheels in .whl/, about 30 MB)
# There:       the device tool's run with command "bash benchmarks/gpu/check.sh", carry [".whl"], timeout_s 600.
#              Stages can be picked: "bash benchmarks/gpu/check.sh tests 256" (default: env tests 256 512 sd3).
#
# Stages, each with its own time limit (570 s in all) so that the whole fits one 10-minute call and a slow stage
# cannot eat the next one's time; the throughput stages write their JSON after every row, so a stage cut short
# keeps the rows it measured:
#   env    the card, driver, torch, and what a large bf16 matrix product reaches on it (the MFU denominator)
#   tests  the GPU-only tests: inductor compile, flash / memory-efficient / xformers attention, Composer FSDP with
#          activation checkpointing, scheduled EMA export and resume, MFU logged; the multi-node SD2 yaml at test size
#   256    benchmarks/throughput.py, SD2-base at 256 px, batch 32, every row
#   512    benchmarks/throughput.py, SD2-base at 512 px, batch 16: baseline, precomputed latents, recipe
#   sd3    benchmarks/throughput.py, the SD3-medium MMDiT (2.03B parameters; its text encoders cut to stubs that keep
#          the conditioning's shapes) on precomputed latents in bf16: batch 16 at 256 px and 4 at 512 px (AdamW's
#          fp32 weights, gradients and moments take ~32 GB), baseline and gradient checkpointing rows, images/s per
#          GPU and MFU from the model's own FLOP count (2,529 / 6,322 GFLOP per image)
#   sd3_compile  (not a default stage: compiling the 2B transformer twice would not fit the call) the same with the
#          torch.compile row; run it alone: "bash benchmarks/gpu/check.sh sd3_compile"
# Everything lands in $OUT (or runs/gpu_check), and the device tool brings it back.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests 256 512 sd3)

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

status=0
run_stage() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -ne 0 ] && status=1
}

for stage in "${stages[@]}"; do
    case $stage in
        env)
            run_stage env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
                python3 - <<EOF
import time, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")
EOF' ;;
        tests)
            run_stage tests 150 python3 -m pytest -q -p no:cacheprovider -rs \
                tests/algorithms/test_compile_denoiser.py tests/algorithms/test_attention_backend.py \
                tests/test_parallelism.py -m 'gpu or slow' \
                --deselect tests/test_parallelism.py::test_two_process_cpu_run_with_the_fsdp_config_trains_with_ddp ;;
        256)
            run_stage throughput_256 200 python3 benchmarks/throughput.py --models sd2 --resolutions 256 \
                --batch-size 32 --json "$OUT/throughput_256.json" ;;
        512)
            run_stage throughput_512 110 python3 benchmarks/throughput.py --models sd2 --resolutions 512 \
                --batch-size 16 --cases latents recipe --json "$OUT/throughput_512.json" ;;
        sd3)
            run_stage throughput_sd3 80 python3 benchmarks/throughput.py --models sd3 --resolutions 256 512 \
                --batch-size 16 4 --cases checkpointing --json "$OUT/throughput_sd3.json" ;;
        sd3_compile)
            run_stage throughput_sd3_compile 570 python3 benchmarks/throughput.py --models sd3 --resolutions 256 512 \
                --batch-size 16 4 --cases compile --json "$OUT/throughput_sd3_compile.json" ;;
        *)
            echo "unknown stage $stage (env, tests, 256, 512, sd3, sd3_compile)" >&2
            exit 2 ;;
    esac
done
exit $status
