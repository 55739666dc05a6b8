"""Decode with a static ONNX graph (:mod:`.static_decode`) the fast way: onnxruntime's IO binding with the KV cache
resident on the device and updated in place, and on a GPU the whole step replayed as one CUDA graph.

Why in place: each ``present.{i}.key|value`` of a static graph is a ``ScatterElements`` of its past, so the
decoder binds both names to the same device buffer; the step then writes one slot per layer instead of copying
the whole cache to a new output. Why a CUDA graph: a decode step of a few layers is hundreds of small kernels, and
launching them one by one costs more than running them (onnxruntime's ``enable_cuda_graph``, which needs every
input and output at a fixed address: the step's small inputs are rewritten in their buffers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_fx.deliver.onnx.runtime import numpy_dtype, open_session, providers
from moe_fx.errors import BadOptionError, MoeFxError


class OnnxDecoder:
    """One-token steps of a static decode graph with its cache on ``device`` (``"cuda"`` or ``"cpu"``).

    ``cuda_graph`` (CUDA only): onnxruntime captures the step on its first run and replays it after that.
    """

    def __init__(self, path: str | Path, *, device: str = "cuda", cuda_graph: bool = True, device_id: int = 0):
        if device not in ("cuda", "cpu"):
            raise BadOptionError(f"device {device!r}: use cuda or cpu")
        chosen = providers(device)  # refuses cuda where onnxruntime has no CUDA provider
        if device == "cuda":  # that provider alone: a CUDA graph needs every node on it
            chosen = [("CUDAExecutionProvider", {"device_id": str(device_id), "enable_cuda_graph": "1" if cuda_graph else "0"})]
        self.session = open_session(path, chosen, "moe-fx export onnx MODEL --out DIR --static-cache LEN")
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "cache_position" not in inputs:
            raise BadOptionError(f"{path} is a dynamic-shape export; OnnxDecoder runs static decode graphs (export with --static-cache LEN)")
        self.device, self.device_id = device, device_id
        past = [n for n in inputs if n.startswith("past_key_values.")]
        self.batch_size, _, self.max_cache_len, _ = inputs[past[0]].shape
        dtype = numpy_dtype(inputs[past[0]])
        self.binding = self.session.io_binding()
        step_inputs = {
            "input_ids": np.zeros((self.batch_size, 1), np.int64),
            "attention_mask": np.zeros((self.batch_size, self.max_cache_len), np.int64),
            "position_ids": np.zeros((self.batch_size, 1), np.int64),
            "cache_position": np.zeros(1, np.int64),
        }
        # host copies of the step's inputs, written to their device buffers before each run; the mask and positions
        # are absent where GroupQueryAttention takes rows of one length
        self._small = {name: array for name, array in step_inputs.items() if name in inputs}
        self._values = {name: self._device_value(array) for name, array in self._small.items()}
        for name, value in self._values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.cache = {}
        for name in past:
            value = self._device_value(np.zeros(inputs[name].shape, dtype))
            self.cache[name] = value
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)  # updated in place
        vocab = self.session.get_outputs()[0].shape[-1]
        self.logits = self._device_value(np.zeros((self.batch_size, 1, vocab), dtype))
        self.binding.bind_ortvalue_output("logits", self.logits)
        self.length = 0
        """Cache slots filled so far (every row holds the same number of tokens)."""

    def _device_value(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def reset(self) -> None:
        """Start a new sequence (the cache's old slots are masked out, so they need no clearing)."""
        self.length = 0

    def step(self, token_ids: np.ndarray) -> None:
        """Run one token per row (``[batch]``) at the next slot; the logits stay on the device (:meth:`last_logits`)."""
        if self.length >= self.max_cache_len:
            raise MoeFxError(f"the static graph's cache holds {self.max_cache_len} tokens and is full (export with a larger --static-cache)")
        small = self._small
        small["input_ids"][:, 0] = token_ids
        if "attention_mask" in small:
            small["attention_mask"][:, self.length] = 1
            small["attention_mask"][:, self.length + 1:] = 0
        if "position_ids" in small:
            small["position_ids"][:] = self.length
        small["cache_position"][0] = self.length
        self.binding.synchronize_outputs()  # the copies below run outside onnxruntime's stream: the last step must be done
        for name, value in self._values.items():
            value.update_inplace(small[name])
        self.session.run_with_iobinding(self.binding)
        self.length += 1

    def synchronize(self) -> None:
        """Wait for the last step (the run returns once its work is queued on the GPU)."""
        self.binding.synchronize_outputs()

    def last_logits(self) -> np.ndarray:
        """``[batch, vocab]`` logits of the last step, on the host."""
        return self.logits.numpy()[:, 0]

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of equal-length prompts (``[rows <= batch, n]``); the prompt runs one token per step."""
        rows, length = input_ids.shape
        if rows > self.batch_size or length + max_new_tokens > self.max_cache_len + 1:
            raise MoeFxError(f"this static graph runs {self.batch_size} rows over a {self.max_cache_len}-token cache; asked for {rows} rows "
                             f"of {length} + {max_new_tokens} tokens")
        ids = np.concatenate([input_ids, input_ids[[0] * (self.batch_size - rows)]]).astype(np.int64)
        self.reset()
        for column in range(length):
            self.step(ids[:, column])
        for _ in range(max_new_tokens):
            nxt = self.last_logits().argmax(-1)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            if ids.shape[1] - length == max_new_tokens:
                break
            self.step(nxt)
        return ids[:rows]
