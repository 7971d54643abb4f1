#!/usr/bin/env bash
# Issue 11's measurements at the Llama-3-8B shape in one command, for a GPU machine lent for a short while:
#   bench/gpu_scale.sh RESULTS_DIR [WORK_DIR]      (WORK_DIR default /dev/shm/scale: about 75 GB at the peak)
# 0. the tests that run only on a GPU (gpu_tests.txt: CUDA read paths, both modes on CUDA);
# 1. convert at tp 1, 2, 8 and pp 2 on every core against the floor (convert.md);
# 2. where a tp 8 conversion's thread-seconds go (convert_phases_tp8.txt);
# 3. verify, both modes in one run and each alone, against the floor (verify.json);
# 4. verify, both modes, under a cap of a quarter of the model (verify_quarter_cap.json);
# 5. verify, both modes, at DEEP_LAYERS (default twice LAYERS: memory flat in depth?) (verify_deep.json).
# Each verify step adds its table to verify.md. At 8B width: 15 GB of model at 32 layers, 28 GB at 64, each
# converted once beside it (the 32-layer conversion is removed before the deeper one).
# Needs shardproof and its dependencies importable (a machine without a package registry: bring blake3's wheel).
# One model serves every step. Each step writes its files into RESULTS_DIR as it ends, under a time limit of its
# own (STEP_TIMEOUT seconds, default 420), so a step cut short loses only itself. STEPS names the steps to run
# (default all; a command on the device machine may run 10 minutes: STEPS="gpu_tests convert phases", then
# STEPS="verify verify_quarter_cap verify_deep" in a second call while the machine is warm). Smaller runs for a try on any
# machine: LAYERS=2 SHAPE="--hidden 256 --intermediate 512 --vocab 1000 --heads 8 --kv-heads 2" DEVICE=cpu.
set -uo pipefail
RESULTS=$(realpath -m "${1:?usage: bench/gpu_scale.sh RESULTS_DIR [WORK_DIR]}")
WORK=${2:-/dev/shm/scale}
LAYERS=${LAYERS:-32}
SHAPE=${SHAPE:---hidden 4096 --intermediate 14336 --vocab 128256 --heads 32 --kv-heads 8}
DEVICE=${DEVICE:-cuda}
STEP=${STEP_TIMEOUT:-420}
STEPS=" ${STEPS:-gpu_tests convert phases verify verify_quarter_cap verify_deep} "
BENCH=$(dirname "$(realpath "$0")")
mkdir -p "$RESULTS" "$WORK/vb"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run under the time limit (when STEPS names it), report how it ended
    local name=$1 rc
    shift
    [[ "$STEPS" == *" $name "* ]] || return 0
    echo "== $name: $*"
    timeout "$STEP" "$@"
    rc=$?
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step gpu_tests bash -c "cd '$BENCH/..' && python3 -m pytest -q -p no:cacheprovider tests/test_tensor_reader.py \
    tests/test_both_modes.py tests/test_verify.py -k 'cuda or gpu' > '$RESULTS/gpu_tests.txt' 2>&1"
# shellcheck disable=SC2086  # SHAPE is a list of options
step convert bash -c "python3 '$BENCH/convert_bench.py' --out '$WORK' $SHAPE --layers $LAYERS \
    --layouts tp1,tp2,tp8,pp2 --workers all --repeats 1 --no-baseline > '$RESULTS/convert.md'"
[ -d "$WORK/hf" ] && ln -sfn "$WORK/hf" "$WORK/vb/hf-$LAYERS"  # the same model for verify, if convert made it
rm -rf "$WORK/phases"
step phases bash -c "python3 '$BENCH/convert_phases.py' --workers $(nproc) --tp_size 8 --dtype float16 '$WORK/hf' \
    '$WORK/phases' > '$RESULTS/convert_phases_tp8.txt'"
rm -rf "$WORK/phases"
quarter() {  # a quarter of the model's bytes in GiB (verify_memory.py builds the model if convert did not)
    python3 -c "import pathlib, sys; print(f'{sum(p.stat().st_size for p in pathlib.Path(sys.argv[1]).glob(\"*.safetensors\")) / 4 / 2**30:.6f}')" "$1"
}
deep=${DEEP_LAYERS:-$((LAYERS * 2))}
for name in verify verify_quarter_cap verify_deep; do
    case $name in
        verify) layers=$LAYERS modes=both,reassembled,sharded cap="" ;;
        verify_quarter_cap) layers=$LAYERS modes=both cap="--max-device-memory $(quarter "$WORK/vb/hf-$LAYERS")" ;;
        verify_deep) layers=$deep modes=both cap=""  # the shallower conversion removed: room for the deeper one
                     [[ "$STEPS" == *" verify_deep "* ]] && rm -rf "$WORK/vb/trt-$LAYERS-tp2" ;;
    esac
    rm -f "$WORK/vb/verify_memory.json"
    # shellcheck disable=SC2086
    step "$name" bash -c "python3 '$BENCH/verify_memory.py' --out '$WORK/vb' $SHAPE --layers $layers --tp 2 \
        --device $DEVICE --num-sequences 2 --seq-len 256 --modes $modes $cap >> '$RESULTS/verify.md'"
    cp "$WORK/vb/verify_memory.json" "$RESULTS/$name.json" 2>/dev/null
done
exit $status
