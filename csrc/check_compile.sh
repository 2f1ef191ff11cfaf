#!/usr/bin/env bash
# Compile every kvfuse kernel with the local nvcc, warnings as errors, from the torch-free headers
# only (no torch, no GPU needed), so a CPU-only CI catches kernels that don't compile.
#   csrc/check_compile.sh              # sm_90a (override: KVFUSE_GENCODE="arch=compute_80,code=sm_80")
#   csrc/check_compile.sh --ptxas      # also print ptxas register / spill use per kernel
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
gencode="${KVFUSE_GENCODE:-arch=compute_90a,code=sm_90a}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
flags=(-std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -gencode "$gencode" -I"$here/include"
       -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)
ptxas=()
[[ "${1:-}" == "--ptxas" ]] && ptxas=(-Xptxas -v)
for src in "$here/tests/instantiate.cu" "$here/tests/test_kernels.cu"; do
  echo "nvcc $(basename "$src")"
  "$nvcc" "${flags[@]}" "${ptxas[@]}" -c "$src" -o "$out/$(basename "$src").o"
done
echo "ok: every kernel compiles for $gencode"
