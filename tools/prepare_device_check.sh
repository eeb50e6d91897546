#!/usr/bin/env bash
# Builds the GPU binaries here (no GPU needed) and stages them for a lent GPU
# machine, which has a CUDA driver but no Bazel and no network:
#
#   tools/prepare_device_check.sh            # -> build/device/
#   (carry build/device and tools/device_check.sh to the GPU machine)
#   OUT=/some/dir tools/device_check.sh      # on the GPU machine
#
# build/device/
#   bin/     kvtier's GPU test and benchmark binaries (cudart linked statically)
#            and gds_check
#   lib/     shared libraries they need beyond glibc (libbenchmark);
#            lib/fallback/ this machine's libstdc++/libgcc_s, used only when
#            the GPU machine's own are too old
#   python/  the kvtier package with its CUDA-enabled extension, built for
#            the GPU machine's Python (3.12 there), and tests/gpu/ to run on it
#   extra/   other teams' GPU executables: drop them here, device_check runs each
#   MANIFEST commit, build flags, glibc requirement
#
# Env: KVTIER_BAZEL_OUTPUT_BASE (bazel --output_base, for a shared machine).
#      KVTIER_DEVICE_PYTHON: an interpreter of the GPU machine's Python
#      version with pybind11 installed (e.g. a pyenv 3.12 venv: python3.12 -m
#      venv v && v/bin/pip install pybind11). Unset: python/ is not staged.
#      The extension is built in its own output base
#      (KVTIER_DEVICE_PY_OUTPUT_BASE, default ~/.cache/kvtier-bazel-device-py)
#      so the main build's Python configuration is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

BAZEL=(bazel)
if [[ -n "${KVTIER_BAZEL_OUTPUT_BASE:-}" ]]; then
  BAZEL+=("--output_base=${KVTIER_BAZEL_OUTPUT_BASE}")
fi
FLAGS=(--config=cuda --config=opt)
TARGETS=(//cuda:kv_copy_probe_test //cuda:kv_copy_cuda_test //cuda:kv_copy_cuda_benchmark
         //cuda:paged_io_test //cuda:paged_io_benchmark //cc/tiers/disk:gds_check)

"${BAZEL[@]}" build "${FLAGS[@]}" "${TARGETS[@]}"
BIN=$("${BAZEL[@]}" info "${FLAGS[@]}" bazel-bin 2>/dev/null)

DEST=build/device
rm -rf "$DEST/bin" "$DEST/lib" "$DEST/python"
mkdir -p "$DEST/bin" "$DEST/lib/fallback" "$DEST/extra"
for t in "${TARGETS[@]}"; do
  pkg=${t#//}; pkg=${pkg%%:*}; name=${t##*:}
  install -m 0755 "$BIN/$pkg/$name" "$DEST/bin/$name"  # none needs runfiles
done

# Everything the binaries load besides glibc and the CUDA driver travels with
# them. A dynamically linked cudart would tie us to the box's toolkit: refuse.
for b in "$DEST"/bin/*; do
  [[ -f "$b" && -x "$b" ]] || continue
  if ldd "$b" | grep -q 'libcudart'; then
    echo "error: $b links libcudart dynamically; it must use cudart_static" >&2
    exit 1
  fi
  ldd "$b" | awk '/=>/ {print $3}' |
    grep -v -E '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*)\.so' |
    while read -r lib; do
      [[ -n "$lib" ]] || continue
      # The box's own C++ runtime is preferred (ours may need a newer glibc);
      # device_check.sh falls back to these copies only if the binaries fail
      # to load without them.
      case "$(basename "$lib")" in
        libstdc++.so.*|libgcc_s.so.*) cp -L "$lib" "$DEST/lib/fallback/" ;;
        *) cp -L "$lib" "$DEST/lib/" ;;
      esac
    done
done

if [[ -n "${KVTIER_DEVICE_PYTHON:-}" ]]; then
  PYBASE=${KVTIER_DEVICE_PY_OUTPUT_BASE:-$HOME/.cache/kvtier-bazel-device-py}
  PY_BAZEL=(bazel "--output_base=$PYBASE")
  PYTHON_BIN_PATH="$KVTIER_DEVICE_PYTHON" "${PY_BAZEL[@]}" build "${FLAGS[@]}" //python/src:extension
  PYBIN=$(PYTHON_BIN_PATH="$KVTIER_DEVICE_PYTHON" "${PY_BAZEL[@]}" info "${FLAGS[@]}" bazel-bin 2>/dev/null)
  mkdir -p "$DEST/python" "$DEST/python/tests"
  cp -r python/kvtier "$DEST/python/"
  find "$DEST/python" -name __pycache__ -prune -exec rm -rf {} +
  install -m 0644 "$PYBIN"/python/src/_kvtier.cpython-*.so "$DEST/python/kvtier/"
  cp -r tests/gpu "$DEST/python/tests/"
  if ldd "$DEST"/python/kvtier/_kvtier.cpython-*.so | grep -q libcudart; then
    echo "error: the extension links libcudart dynamically" >&2
    exit 1
  fi
else
  echo "KVTIER_DEVICE_PYTHON unset: the Python package is not staged (see the header)" >&2
fi

glibc=$(for b in "$DEST"/bin/* "$DEST"/lib/*; do [[ -f "$b" ]] && objdump -T "$b" 2>/dev/null; done |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "flags: ${FLAGS[*]}"
  echo "python: $( [[ -n "${KVTIER_DEVICE_PYTHON:-}" ]] && "$KVTIER_DEVICE_PYTHON" -V 2>&1 || echo none)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo "arch: sm_80 sm_90 + compute_90 PTX"
  echo "needs: ${glibc} or newer, a CUDA 13-capable driver"
} > "$DEST/MANIFEST"
echo "staged in $DEST:"
ls -l "$DEST/bin" "$DEST/lib"
cat "$DEST/MANIFEST"
