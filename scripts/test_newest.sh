#!/usr/bin/env bash
# The newest transformers that pip resolves today (no constraints.txt pin), in its own environment
# (.venv-newest), on a broad subset of the suite: every family's discovery, prune -> save -> reload and
# per-layer format, the experts kernels and the compiled graph, the graph backend's matcher, ONNX export (fused MoE
# and QMoE nodes, the plain-op fallback, static graphs' GroupQueryAttention nodes) of
# several families, the decode attention rewrite, streaming equality, the quantized checkpoint formats stock transformers loads, pruning a quantized
# checkpoint, the quantized
# experts, and the CLI recipes' fast subset. CI runs it after scripts/test.sh;
# a failure here means a transformers release changed something moe-fx relies on. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_FX_VENV=.venv-newest MOE_FX_CONSTRAINTS="" bash scripts/setup.sh
# the newest release: installing with --upgrade keeps an environment made on an earlier day current
.venv-newest/bin/python -m pip install -q --upgrade transformers 2>&1 | grep -v "^WARNING: Location" || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # as scripts/test.sh: a test file to a process, one torch thread each
exec .venv-newest/bin/python -m pytest -q -p no:cacheprovider -n "${MOE_FX_TEST_WORKERS:-2}" --dist loadfile \
    tests/test_families.py \
    "tests/test_per_layer.py::test_per_layer_format_every_family" \
    "tests/test_moe_experts.py::test_equals_eager_for_every_family" \
    "tests/test_moe_experts.py::test_compiles_whole_graph" \
    tests/test_static_cache.py \
    tests/test_prescaled.py \
    tests/test_topk_kernel.py \
    tests/test_decode_attention.py \
    tests/test_sibling_linears.py \
    tests/test_real_rotary.py \
    "tests/test_graph_backend.py::test_every_tiny_family_is_matched_and_virtually_pruned" \
    "tests/test_onnx.py::test_pruned_family_exports_and_matches" \
    "tests/test_onnx.py::test_sliding_window_past_the_window" \
    "tests/test_onnx.py::test_cli_exports_the_trained_micro_model" \
    "tests/test_onnx_fused.py::test_integer_weights" \
    "tests/test_onnx_fused.py::test_block_the_operator_cannot_express_falls_back" \
    "tests/test_onnx_gqa.py::test_each_layer_is_one_node_writing_its_cache" \
    "tests/test_onnx_gqa.py::test_layers_the_node_cannot_express_keep_their_ops" \
    "tests/test_onnx_gqa.py::test_sinks_and_sliding_windows_go_into_the_node" \
    "tests/test_onnx_dense_int4.py::test_export_matches_the_dequantized_model" \
    "tests/test_onnx_static.py::test_decoder_generates_what_pytorch_does" \
    "tests/test_streaming.py::test_streaming_equals_in_memory" \
    "tests/test_streaming.py::test_cli_stream" \
    tests/test_checkpoint.py \
    "tests/test_fp8_block.py::test_checkpoint_loads_in_stock_transformers" \
    "tests/test_compressed_experts.py::test_checkpoint_loads_in_stock_transformers" \
    tests/test_quantized_sources.py \
    "tests/test_quantized_experts.py::test_every_family_matches_dequantized_reference" \
    "tests/test_recipes.py::test_recipe" \
    tests/test_environment.py \
    "$@"
