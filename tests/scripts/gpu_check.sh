#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the tests marked `gpu` (every device-parametrised
# test on CUDA: the float64 simulations of the real optimizer steps, bitwise-unchanged training, no
# host synchronisation on non-logging steps under torch's sync debug mode, NoetherMonitor under a
# GPU Trainer), then `nld bench --device cuda` with the arguments given (its sync-debug-mode runs
# included). Logs go to $OUT, or ./gpu_check_logs.
#
#   bash tests/scripts/gpu_check.sh                 # the tests, then the whole benchmark
#   bash tests/scripts/gpu_check.sh --quick         # the tests, then a seconds-long benchmark
set -u
cd "$(dirname "$0")/../.."
logs=${OUT:-gpu_check_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
    tests/test_charges.py tests/test_tracker.py tests/test_robustness.py tests/test_callback.py \
    tests/test_lightning_setups.py 2>&1 | tee "$logs/pytest_gpu.log"
tests=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-400}" python3 -m nld_callbacks.cli bench --device cuda "$@" 2>&1 | tee "$logs/bench_cuda.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, bench exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
