"""ONNX export in Optimum's decoder layout (:func:`export_onnx`) and an onnxruntime runner that checks it
against PyTorch (:class:`OnnxCausalLM`, :func:`check_parity`)."""

from moe_fx.deliver.onnx.export import OnnxExport, OnnxParityError, export_onnx
from moe_fx.deliver.onnx.runtime import OnnxCausalLM, Parity, check_parity

__all__ = ["OnnxCausalLM", "OnnxExport", "OnnxParityError", "Parity", "check_parity", "export_onnx"]
