"""Delivering a pruned model to the runtimes people deploy on: ``moe_fx.compile`` (whole-graph torch.compile
with the moe_fx experts kernels), the torch.compile backend and its FX passes (:mod:`~moe_fx.deliver.graph`),
and ONNX export checked in onnxruntime (:mod:`~moe_fx.deliver.onnx`)."""
