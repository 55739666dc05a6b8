"""Calibrate: run calibration tokens through the model with observers attached; store CalibrationStats."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_fx.calibrate import distributed
from moe_fx.calibrate.data import TokenBatch, calibration_tokens
from moe_fx.calibrate.hooks import check_observable, check_routed, instrument, router_logits, router_probs
from moe_fx.calibrate.observers import OBSERVERS, ChannelGradObserver, ChannelObserver, InputObserver, Observer, ReapObserver, RoutingEvent, RoutingObserver, SampleObserver
from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import BadOptionError, HostMemoryError, out_of_memory
from moe_fx.model.attention import calibration_attention
from moe_fx.model.expert_math import check_expert_math
from moe_fx.model.mode import eval_mode
from moe_fx.model.spec import MoEModelSpec
from moe_fx.pipeline import MoEState, Pass, PassResult
from moe_fx.progress import progress_bar

__all__ = [
    "OBSERVERS",
    "Calibrate",
    "ChannelGradObserver",
    "ChannelObserver",
    "InputObserver",
    "Observer",
    "ReapObserver",
    "RoutingEvent",
    "RoutingObserver",
    "SampleObserver",
    "instrument",
    "router_logits",
    "router_probs",
    "calibration_stats",
    "check_host_memory",
    "fits_on_gpu",
    "keep_samples_on",
    "host_memory_available",
    "run_calibration",
]


_COMPILED_FORWARD_ONLY = "compiled calibration runs forward passes only; observers that need gradients ({}) need Calibrate(compiled=False)"


def run_calibration(
    model: nn.Module,
    state: MoEState,
    tokens: TokenBatch,
    observers: list[Observer],
    *,
    batch_size: int,
    show_progress: bool = True,
    compiled: bool = False,
) -> CalibrationStats:
    """Forward every calibration window once with observers attached; return their running sums.

    ``compiled``: the observers run inside the graph that ``torch.compile`` captures (:mod:`moe_fx.deliver.graph.instrument`)
    instead of as Python hooks around each experts call; the statistics are the same."""
    device = next(model.parameters()).device
    keep_samples_on(state.spec, observers, device)  # every block's sample, on a GPU where they fit
    t0 = time.perf_counter()
    needs_grads = any(o.needs_grads for o in observers)
    if compiled and needs_grads:
        raise BadOptionError(_COMPILED_FORWARD_ONLY.format([o.name for o in observers if o.needs_grads]))
    with eval_mode(model):
        windows = distributed.shard(tokens.input_ids)
        with _observed(model, state, observers, compiled) as (runner, accumulators), _backward_mode(model) if needs_grads else torch.no_grad():
            with progress_bar("calibrate", total=windows.numel(), unit="tok", enabled=show_progress and distributed.is_main()) as bar:
                for i in range(0, windows.shape[0], batch_size):
                    batch = windows[i : i + batch_size].to(device)
                    try:
                        if needs_grads:
                            _loss(model, batch).backward()
                        else:
                            runner(input_ids=batch, use_cache=False)
                    except torch.OutOfMemoryError:
                        raise out_of_memory("calibration" + (" (forward and backward)" if needs_grads else ""), device, tuple(batch.shape),
                                            "lower --batch-size or --seq-len, or prune layer by layer with --stream on") from None
                    bar.update(batch.numel())
            acc = accumulators()
            if distributed.active():
                reduce_across_ranks(acc, state.spec, observers)
    return calibration_stats(acc, tokens, time.perf_counter() - t0)


@contextlib.contextmanager
def _observed(model: nn.Module, state: MoEState, observers: list[Observer], compiled: bool):
    """``(runner, accumulators)``: what to call on each batch and a function giving the observers' sums."""
    if not compiled:
        with instrument(model, state.spec, observers) as acc, calibration_attention(model):
            yield model, lambda: acc
        return
    from moe_fx.deliver.graph import InstrumentPass
    from moe_fx.deliver.graph import compiled as compile_with

    instrument_pass = InstrumentPass(observers)
    # calibration windows have one shape: on CUDA each graph is recorded once and replayed (no launch overhead)
    cuda = next(model.parameters()).device.type == "cuda"
    runner, _ = compile_with(model, [instrument_pass], options={"triton.cudagraphs": True} if cuda else None)
    yield runner, instrument_pass.accumulators


def calibration_stats(acc: dict[str, dict[str, torch.Tensor]], tokens: TokenBatch, seconds: float) -> CalibrationStats:
    """The observers' accumulators (moved to the CPU) with a description of the tokens they saw."""
    return CalibrationStats(
        per_block={path: {k: v.cpu() for k, v in a.items()} for path, a in acc.items()},
        tokens=tokens.num_tokens,
        sequences=tokens.input_ids.shape[0],
        seq_len=tokens.input_ids.shape[1],
        fingerprint=tokens.fingerprint,
        source=tokens.source,
        seconds=seconds,
    )


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ``batch`` (a sum, so every token weighs the same in every batch)."""
    from moe_fx.evaluate.nll import next_token_nll  # here: moe_fx.evaluate imports this package's data module

    return next_token_nll(model(input_ids=batch, use_cache=False).logits[:, :-1], batch[:, 1:])


@contextlib.contextmanager
def _backward_mode(model: nn.Module):
    """Gradients flow through the activations only: parameters are frozen for the duration (no weight
    gradients are stored) and the embedding output is made to require grad, so the graph is built."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)


def reduce_across_ranks(acc: dict[str, dict[str, torch.Tensor]], spec, observers: list[Observer]) -> None:
    """Combine every block's accumulators over the ranks, each observer its own (see moe_fx.calibrate.distributed)."""
    for block in spec.blocks:
        for o in observers:
            with torch.device("meta"):  # only the accumulator names: allocate nothing
                keys = list(o.init(block, torch.device("meta")))
            o.reduce(acc[block.path], keys)


def host_memory_available() -> int | None:
    """Bytes the OS says a new allocation can take without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(spec: MoEModelSpec, observers: list[Observer], *, streamed: bool = False, available: int | None = None) -> None:
    """Refuse, before any token is run, sampled statistics that would not fit in CPU memory.

    The sampling observers keep their tokens on the CPU for every block until the passes have run (a streamed run:
    for the block being processed), and at full size that is what grows: NAEE/SHAPE's sample holds every expert's
    output, ``samples x E x H`` floats, 1 GiB a block at Qwen3-30B-A3B's shapes, 48 GiB for its 48 blocks.
    ``available``: the bytes to compare with (default :func:`host_memory_available`; no check where unknown)."""
    held = [o for o in observers if o.on_host]
    available = host_memory_available() if available is None else available
    if not held or available is None or not spec.blocks:
        return
    per_block = [sum(o.accumulator_bytes(b) for o in held) for b in spec.blocks]
    need = max(per_block) if streamed else sum(per_block)
    if need <= available:
        return
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    parts = ", ".join(f"{o.name} {gib(o.accumulator_bytes(spec.blocks[0]))}" for o in held)
    where = "for the block being streamed" if streamed else f"for all {len(spec.blocks)} blocks"
    fix = ("lower the sample: --search-samples (Calibrate.samples_per_block) for NAEE/SHAPE/merging, --compensate-samples "
           "(inputs_per_block) for compensation")
    if not streamed:
        fix = f"stream the model (--stream on / moe_fx.stream_prune holds one block's sample) or {fix}"
    raise HostMemoryError(f"calibration would keep {gib(need)} of sampled tokens in CPU memory {where} (a block: {parts}) "
                          f"and {gib(available)} is available: {fix}")


def fits_on_gpu(device: str | torch.device, nbytes: int, share: float = 0.25) -> bool:
    """Whether ``device`` is a GPU and ``nbytes`` take at most ``share`` of its free memory: the rule for what calibration
    keeps on the GPU beside the model (a streamed run's hidden states with ``states="auto"``, the token samples)."""
    device = torch.device(device)
    return device.type == "cuda" and nbytes <= torch.cuda.mem_get_info(device)[0] * share


def keep_samples_on(spec: MoEModelSpec, observers: list[Observer], device: str | torch.device, share: float = 0.25) -> bool:
    """Keep the sampled tokens of ``spec``'s blocks (a streamed run: one layer's) on ``device`` while calibration runs,
    when it is a GPU and they take at most ``share`` of its free memory; return whether they are. They reach the
    passes in CPU memory either way (:func:`calibration_stats`), one copy at the end instead of one per batch.

    In CPU memory every batch copies its accepted tokens to the host and synchronizes: 43% of the GPU time of a
    streamed GPT-OSS-20B layer with compensation (``benchmarks/results/scale_h200/gpt-oss-20b_stream_profile_h100.log``).
    The values are the same either way."""
    sampled = [o for o in observers if o.on_host]
    if torch.device(device).type != "cuda" or not sampled or not spec.blocks:
        return False
    if not fits_on_gpu(device, sum(o.accumulator_bytes(b) for o in sampled for b in spec.blocks), share):
        return False
    for o in sampled:
        o.device = torch.device(device)
    return True


@dataclass
class Calibrate(Pass):
    """Record routing statistics and REAP saliency over calibration data.

    ``data``: a path (.txt / .jsonl(.gz)), a list of strings, a ``LongTensor [N, L]`` or a TokenBatch.
    Text is tokenized with ``tokenizer`` (default: the model's own, from ``model.name_or_path``).
    """

    data: Any = None
    tokenizer: Any = None
    max_tokens: int = 200_000
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    observers: tuple[str, ...] = ("routing", "reap")
    samples_per_block: int = 1024
    """Tokens per block kept by the ``samples`` observer (with every expert's output) for search methods."""
    inputs_per_block: int = 16384
    """Tokens per block kept by the ``inputs`` observer (input, logits, routed output) for CompensateExperts."""
    show_progress: bool = True
    compiled: bool = False
    """Run the observers inside the compiled graph (:mod:`moe_fx.deliver.graph`): calibration at compiled speed, same
    statistics; forward-pass observers only (``routing``, ``reap``, ``channels``)."""
    name = "calibrate"

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        """Experts calls the hooks can observe, and for observers that read inside the experts (channels),
        experts whose activations :class:`~moe_fx.model.expert_math.ExpertMath` reproduces."""
        observers = self.make_observers()
        check_observable(spec, observers)
        if self.compiled:
            check_routed(spec)
        if any(o.needs_math for o in observers):
            for block in spec.blocks:
                check_expert_math(model.get_submodule(block.experts.path), block.experts)
        if self.compiled and any(o.needs_grads for o in observers):
            raise BadOptionError(_COMPILED_FORWARD_ONLY.format([o.name for o in observers if o.needs_grads]))

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        tokens, observers = self.tokens(model), self.make_observers()
        check_host_memory(state.spec, observers)
        state.stats = run_calibration(model, state, tokens, observers, batch_size=self.batch_size, show_progress=self.show_progress,
                                      compiled=self.compiled)
        return PassResult(model, False, state.stats.summary())

    def tokens(self, model: nn.Module) -> TokenBatch:
        """Check the options; the calibration windows (tokenized with the model's tokenizer unless given). A
        streaming run (:mod:`moe_fx.run.streaming`) feeds them layer by layer, with :meth:`make_observers` per layer."""
        if self.data is None:
            raise BadOptionError("Calibrate needs data: a text/jsonl path, a list of strings or a token tensor")
        if self.batch_size < 1 or self.max_tokens < 1:
            raise BadOptionError(f"batch_size and max_tokens must be positive, got {self.batch_size} and {self.max_tokens}")
        tokenizer = self.tokenizer
        if tokenizer is None and not isinstance(self.data, (torch.Tensor, TokenBatch)):
            from moe_fx.formats.loading import load_tokenizer

            tokenizer = load_tokenizer(model.name_or_path)
        return calibration_tokens(self.data, tokenizer, seq_len=self.seq_len, max_tokens=self.max_tokens, seed=self.seed)

    def make_observers(self) -> list[Observer]:
        """Fresh observers (zero state) for the configured names."""
        unknown = [o for o in self.observers if o not in OBSERVERS]
        if unknown:
            raise BadOptionError(f"unknown observers {unknown}; available: {sorted(OBSERVERS)}")
        return [self._observer(OBSERVERS[o]) for o in self.observers]

    def _observer(self, cls: type[Observer]) -> Observer:
        """Sampling observers get their sample size (the Calibrate field named by ``size_option``) and the seed."""
        option = getattr(cls, "size_option", None)
        if option is None:
            return cls()
        size = getattr(self, option)
        if size < 1:
            raise BadOptionError(f"{option} must be positive, got {size}")
        return cls(size, self.seed)
