"""Run an exported decoder in onnxruntime the way Optimum's ``ORTModelForCausalLM`` does, and check it
against PyTorch: logits step by step, and greedy generation token for token.

The graph's interface is Optimum's decoder layout (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` in; ``logits``, ``present.{i}.key|value`` out), so the runner here is also
what our tests use to show that a directory works where Optimum would load it. A static decode graph
(:mod:`.static_decode`: one token per step, fixed batch and cache length) runs here token by token; its fast
path on a GPU is :class:`~moe_fx.deliver.onnx.decoder.OnnxDecoder`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe_fx.errors import MoeFxError

ONNX_FILE = "model.onnx"


def providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA when asked for (or ``auto`` and present), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise MoeFxError("onnxruntime has no CUDA execution provider here; install moe-fx[onnx-gpu] (onnxruntime-gpu) or use --device cpu")
    return ["CPUExecutionProvider"]


def open_session(path: str | Path, providers: list, hint: str):
    """An onnxruntime session of ``path`` (a directory holding ``model.onnx``, or the file), quiet below errors;
    ``hint`` is the export command to name when there is no graph."""
    import onnxruntime as ort

    path = Path(path)
    file = path / ONNX_FILE if path.is_dir() else path
    if not file.is_file():
        raise MoeFxError(f"{path}: no {ONNX_FILE} (export one with `{hint}`)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(file), options, providers=providers)


def numpy_dtype(value) -> type:
    """The numpy dtype of a float graph input (``tensor(float16)`` or ``tensor(float)``)."""
    return np.float16 if "float16" in value.type else np.float32


class OnnxCausalLM:
    """An exported causal LM in an onnxruntime session: forward with an explicit past, and greedy generation."""

    def __init__(self, path: str | Path, *, device: str = "auto"):
        self.session = open_session(path, providers(device), "moe-fx export onnx MODEL --out DIR")
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.static = "cache_position" in self.inputs
        """A static decode graph: fixed ``batch_size`` and ``max_cache_len``, one token per step."""
        if self.static:
            self.batch_size, _, self.max_cache_len, _ = self.inputs[self.past_names[0]].shape

    @property
    def with_past(self) -> bool:
        return bool(self.past_names)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors (what Optimum feeds on the first step); a static graph's whole cache, zeroed."""
        past = {}
        for name in self.past_names:
            graph_batch, heads, length, head_dim = self.inputs[name].shape
            past[name] = np.zeros((graph_batch, heads, length, head_dim) if self.static else (batch, heads, 0, head_dim), dtype=numpy_dtype(self.inputs[name]))
        return past

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of ``input_ids`` after ``past`` (``None``: the graph has no past); returns the new past too."""
        if self.static:
            return self._forward_static(input_ids, attention_mask, past)
        total = attention_mask.shape[1]
        positions = np.cumsum(attention_mask, axis=-1) - 1
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": np.maximum(positions, 0)[:, total - input_ids.shape[1]:].astype(np.int64),
        }
        feed.update(past or {})
        return self._run(feed)

    def _run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The graph's logits and its presents named as the next step's past, fed what of ``feed`` it takes (a fused
        static graph has no mask or positions)."""
        outs = dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})))
        return outs["logits"], {n.replace("present.", "past_key_values.", 1): v for n, v in outs.items() if n.startswith("present.")}

    def _forward_static(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`forward` through a static decode graph: one step per token, each written to its slot of the cache.
        Fewer rows than the graph's batch are padded with copies of the first and cut from the logits."""
        rows, new = input_ids.shape
        total = attention_mask.shape[1]
        if rows > self.batch_size or total > self.max_cache_len:
            raise MoeFxError(f"this static graph runs {self.batch_size} rows over a {self.max_cache_len}-token cache; got {rows} rows "
                             f"and {total} tokens (export again with --batch-size/--static-cache large enough)")
        if "attention_mask" not in self.inputs and not attention_mask.all():
            raise MoeFxError("this static graph's attention (onnxruntime's GroupQueryAttention) takes no padding mask: every row must "
                             "hold the same number of tokens; export with --attention plain for padded batches")
        pad = [0] * (self.batch_size - rows)
        ids = np.concatenate([input_ids, input_ids[pad]]).astype(np.int64)
        mask = np.zeros((self.batch_size, self.max_cache_len), np.int64)
        mask[:, :total] = np.concatenate([attention_mask, attention_mask[pad]])
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        logits = []
        for slot in range(total - new, total):
            step_mask = np.where(np.arange(self.max_cache_len) <= slot, mask, 0)
            feed = {"input_ids": ids[:, slot - total + new, None], "attention_mask": step_mask,
                    "position_ids": positions[:, slot, None], "cache_position": np.array([slot], np.int64), **past}
            step_logits, past = self._run(feed)
            logits.append(step_logits[:rows])
        return np.concatenate(logits, axis=1), past

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy continuation of one or more unpadded prompts (stops early only when every row hit ``eos``)."""
        ids = input_ids.astype(np.int64)
        past = self.empty_past(ids.shape[0]) if self.with_past else None
        step = ids
        done = np.zeros(ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            logits, present = self.forward(step if self.with_past else ids, np.ones_like(ids), past)
            nxt = logits[:, -1].argmax(-1)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            past, step = (present, nxt[:, None]) if self.with_past else (None, ids)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if done.all():
                    break
        return ids


@dataclass(frozen=True)
class Parity:
    """How closely the ONNX graph in onnxruntime reproduces the PyTorch model."""

    max_abs_logit_diff: float
    logit_scale: float
    steps_checked: int
    generated_tokens: int
    greedy_identical: bool
    first_mismatch: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_parity(model: nn.Module, runner: OnnxCausalLM, *, prompt_len: int = 12, steps: int = 4, new_tokens: int = 16, seed: int = 0) -> Parity:
    """Compare ``runner`` with ``model`` on seeded random prompts.

    Logits: a batch of two prompts (one for a static graph of batch 1), first with an empty past (prefill), then ``steps`` one-token steps
    through the returned past, each against a full PyTorch forward of the same tokens. Generation: greedy
    ``new_tokens`` from one prompt, against ``model.generate`` (which stops at EOS; so does the runner).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    rows = min(2, runner.batch_size) if runner.static else 2
    ids = torch.randint(3, min(vocab, 32000), (rows, prompt_len + steps), generator=generator)
    device = next(model.parameters()).device
    reference = model(ids.to(device)).logits.float().cpu().numpy()

    diffs = []
    past = runner.empty_past(rows) if runner.with_past else None
    for cut in range(prompt_len, prompt_len + steps + 1):
        start = cut - 1 if runner.with_past and cut > prompt_len else 0  # with a past: only the new token
        logits, present = runner.forward(ids[:, start:cut].numpy(), np.ones((rows, cut), np.int64), past)
        diffs.append(np.abs(logits.astype(np.float32) - reference[:, start:cut]).max())
        past = present if runner.with_past else None

    prompt = ids[:1, :prompt_len]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    expected = model.generate(prompt.to(device), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos if eos is not None else 0).cpu().numpy()[0]
    got = runner.generate(prompt.numpy(), new_tokens, eos_token_id=eos)[0]
    n = min(len(expected), len(got))
    mismatch = np.nonzero(expected[:n] != got[:n])[0]
    first = int(mismatch[0]) - prompt_len if mismatch.size else (None if len(expected) == len(got) else n - prompt_len)
    return Parity(
        max_abs_logit_diff=float(max(diffs)),
        logit_scale=float(np.abs(reference).max()),
        steps_checked=len(diffs),
        generated_tokens=len(expected) - prompt_len,
        greedy_identical=first is None,
        first_mismatch=first,
    )
