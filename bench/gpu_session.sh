#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call under its 600 s command limit (caps sum to 585 s):
# build, the `gpu` tests, the op suite, interactive-session latency and the resource table.
# Every log and JSON goes to $OUT (what comes back from the machine); copy the JSON into
# bench/results/ afterwards. Each step has its own time cap, so one slow step cannot eat the rest.
#
# The shared data does not travel with the repository, and the device image lacks nibabel and
# pydicom (it has torch, triton, safetensors, tokenizers, tqdm, hypothesis): copy both into the
# ignored .device_data/ first and carry it:
#     mkdir -p .device_data && cp -r ../shared/data/. .device_data/
#     pip download nibabel pydicom --no-deps -d .device_data/wheels
#     device run: command "SEGEVOL_DATA=.device_data bash bench/gpu_session.sh", carry [".device_data"]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results}
export OUT
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run with a cap, log to $OUT/NAME.log, report the exit code
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s (cap $cap s)" | tee -a "$OUT/steps.txt"
    tail -n 8 "$OUT/$name.log"
    return 0
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
if [ -d "${SEGEVOL_DATA:-.device_data}/wheels" ]; then  # carried pure-Python wheels, no index there
    step wheels 30 python3 -m pip install --no-index --no-deps "${SEGEVOL_DATA:-.device_data}"/wheels/*.whl
fi
step build 150 python3 -m pip install --no-build-isolation --no-deps -e .
step gpu_tests 120 python3 -m pytest tests -m gpu -q -p no:cacheprovider
step gpu_suite 90 python3 bench/gpu_suite.py --out "$OUT"
step session 45 python3 bench/session_bench.py --device cuda --out "$OUT"
step resources 150 python3 bench/resource_table.py --device cuda --timeout 60 --out "$OUT"
cat "$OUT/steps.txt"
