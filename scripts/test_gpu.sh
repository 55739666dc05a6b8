#!/usr/bin/env bash
# The tests that need a CUDA GPU (elsewhere they skip, so CI on CPUs never runs them): run this on a GPU machine with a
# python whose torch has CUDA (PYTHON=..., default python3, with moe-fx importable). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'scripts/test_gpu.sh: torch sees no CUDA device in ' + sys.executable)"
exec "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_calibrate.py tests/test_streaming.py tests/test_stream_io.py tests/test_attention.py \
    tests/test_quantized_experts.py tests/test_topk_kernel.py tests/test_decode_attention.py tests/test_channels.py tests/test_kernels_ptx.py tests/test_onnx_static.py tests/test_onnx_gqa.py \
    -k "gpu or cuda or topk_kernel or kernels_ptx or decode_attention" "$@"
