#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with CUDA (CI has none): the
# CUDA-against-CPU tests, the zoo's conv nets (ResNet-18 in its own step) against the same
# machine's CPU, the MLP benchmark, the 10^6-region MLPs on the device and on the CPU, and
# the quick zoo.
# Figures go to OUTDIR as JSON lines. Device figures come from their own processes,
# before the slow CPU ones, so that a step cut off at its limit loses only its own figure.
#
#   bash benchmarks/cuda.sh [OUTDIR]            # default: $OUT or /tmp/geomstore-cuda
#
# Packages the machine lacks (duckdb, shapely) travel as wheels in .whl/ (git-excluded),
# installed into /tmp/site; fetch them here first (the machine's Python is 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       -d .whl duckdb==1.5.5 shapely
# and name .whl in the run's carry. Each step has its own time limit (seconds, from the
# environment: T_TESTS, T_MLP, T_LARGE, T_HUGE, T_ZOO, T_ZOO_CONV, T_PROFILE, T_ZOO_R18,
# T_CPU_LARGE, T_CPU_HUGE). STEPS picks steps and their order (default: all, in the order
# below), e.g. STEPS="tests zoo-conv profile"; ZOO_CONV names the zoo-conv step's nets.
set -u
out=${1:-${OUT:-/tmp/geomstore-cuda}}
mkdir -p "$out"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
step() { echo "== $1 ($(date +%T))"; }
bench="python3 benchmarks/partition.py --repeat 2 --no-ops --no-busy"  # timeout runs no functions

step_tests() {
    timeout "${T_TESTS:-70}" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
        tests/test_engine.py::test_cuda_matches_cpu 2>&1 | tail -25 | tee "$out/tests.txt"
}
step_zoo_conv() {  # the compute-bound conv nets, first run and cached, against this CPU
    timeout "${T_ZOO_CONV:-200}" python3 benchmarks/zoo.py --device cuda --compare-cpu \
        --repeat 3 --no-verify --count-under 0 --only ${ZOO_CONV:-lenet5 resnet20 vgg11} \
        2>/dev/null | tee -a "$out/zoo-conv.jsonl"
}
step_profile() {  # where LeNet-5's cached GPU partition spends its host time
    timeout "${T_PROFILE:-60}" python3 benchmarks/zoo_profile.py --device cuda --only lenet5 \
        --table "$out/profile.txt" 2>/dev/null | tee "$out/profile.jsonl"
}
step_mlps() {
    timeout "${T_MLP:-45}" python3 benchmarks/partition.py --device cuda --compare-cpu \
        --repeat 2 | tee -a "$out/partition.jsonl"
}
step_large() {
    timeout "${T_LARGE:-30}" $bench --device cuda --widths 1024,1024 | tee -a "$out/partition.jsonl"
    timeout "${T_HUGE:-40}" $bench --device cuda --widths 2048,2048 | tee -a "$out/partition.jsonl"
}
step_cpu_large() {
    timeout "${T_CPU_LARGE:-45}" $bench --device cpu --widths 1024,1024 \
        | tee -a "$out/partition.jsonl"
}
step_zoo() {
    timeout "${T_ZOO:-60}" python3 benchmarks/zoo.py --device cuda --compare-cpu --quick \
        2>/dev/null | tee "$out/zoo.jsonl"
}
step_zoo_r18() {  # ResNet-18: first run and one cached, both devices
    timeout "${T_ZOO_R18:-150}" python3 benchmarks/zoo.py --device cuda --compare-cpu \
        --repeat 1 --no-verify --count-under 0 --only resnet18 2>/dev/null \
        | tee "$out/zoo-r18.jsonl"
}
step_cpu_huge() {  # a lower bound is enough: the ratio needs only "CPU s > limit"
    timeout "${T_CPU_HUGE:-120}" $bench --device cpu --widths 2048,2048 \
        | tee -a "$out/partition.jsonl"
}

all="tests zoo-conv profile mlps large cpu-large zoo zoo-r18 cpu-huge"
steps=${STEPS:-$all}
for name in $steps; do
    if ! declare -F "step_${name//-/_}" >/dev/null; then
        echo "cuda.sh: no step '$name' in STEPS; the steps are: $all" >&2
        exit 2
    fi
done

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi

step gpu
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "cuda.sh: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU" \
        "machine. The CPU benchmarks are benchmarks/partition.py and benchmarks/zoo.py." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())" \
    | tee -a "$out/gpu.txt"

for name in $steps; do
    step "$name"
    "step_${name//-/_}"
done
step done
