#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the whole test suite on the GPU (every backend),
# and run compute-sanitizer (memcheck, racecheck) over one small call of every CUDA and Triton kernel.
# Logs go to $OUT (or ./bench/out). Usage: bash bench/gpu_validate.sh
set -uo pipefail
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, setuptools; print('torch', torch.__version__, 'triton', triton.__version__, 'setuptools', setuptools.__version__)"
t0=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
python3 -c "import kvfuse, kvfuse._C, kvfuse.triton_kernels.attention; print('backends:', kvfuse.dispatch.PRIORITY)"
t0=$SECONDS
python3 -m pytest -q -p no:cacheprovider -n 8 tests >"$out/pytest.log" 2>&1
rc=$?
echo "pytest (rc=$rc): $((SECONDS - t0)) s"
grep -E "passed|failed" "$out/pytest.log" | tail -3
grep -E "^FAILED" "$out/pytest.log" | head -20
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --print-limit 20 python3 bench/gpu_check_cuda.py --small >"$out/sanitizer_cuda_$tool.log" 2>&1
  echo "compute-sanitizer $tool (cuda kernels): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_cuda_$tool.log" | tail -1)"
done
compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
  >"$out/sanitizer_triton_memcheck.log" 2>&1
echo "compute-sanitizer memcheck (triton kernel tests): $(grep -E 'ERROR SUMMARY' "$out/sanitizer_triton_memcheck.log" | tail -1)"
exit $rc
