"""ONNX export in Optimum's decoder layout (:func:`export_onnx`) and an onnxruntime runner that checks it
against PyTorch (:class:`OnnxCausalLM`, :func:`check_parity`); static decode graphs (:class:`StaticShape`) run fast
with :class:`OnnxDecoder` (the cache in place on the device, CUDA graphs)."""

from moe_fx.deliver.onnx.decoder import OnnxDecoder
from moe_fx.deliver.onnx.export import OnnxExport, OnnxParityError, export_onnx
from moe_fx.deliver.onnx.runtime import OnnxCausalLM, Parity, check_parity
from moe_fx.deliver.onnx.static_decode import StaticShape

__all__ = ["OnnxCausalLM", "OnnxDecoder", "OnnxExport", "OnnxParityError", "Parity", "StaticShape", "check_parity", "export_onnx"]
