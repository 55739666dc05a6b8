"""Prune a model bigger than the GPU, and than CPU RAM: one decoder layer at a time (``moe-fx prune --stream``).

The model is built on the meta device (:func:`~moe_fx.formats.lazy.meta_model`); only the tensors outside
the decoder layers (embeddings, final norm, head) are loaded, and they stay on the CPU except while the
model's own forward prepares every layer's call (:mod:`moe_fx.model.layers`). The calibration windows are
embedded once; then for each layer: its tensors are read from the memory-mapped checkpoint onto the device,
the hidden states of every window go through it with the observers attached (becoming the next layer's
input, kept on the CPU), the layer-local passes run on a state that holds this layer's blocks alone (score,
drop or merge, compensate, prune channels), the rewritten tensors are written as this layer's shard in the
layout ``save_pretrained`` writes, and the layer goes back to meta.

Every layer sees the hidden states of the *unpruned* layers before it, through the same instrumented calls
and batches as :class:`~moe_fx.passes.Calibrate` in memory, so a streamed run picks the same experts and
writes the same tensors as the in-memory pipeline (bit-identical on the CPU: ``tests/test_streaming.py``).
With ``sequential=True`` (``--sequential``) each rewritten layer runs again on its input instead, so the next layer
is calibrated, scored and compensated on the hidden states the *pruned* model feeds it (as GPTQ and SparseGPT
calibrate layer after layer): the unpruned layer is only observed, and the rewritten one runs once more to hand on
its output. On qwen3moe-bench (8 layers) it lowered the loss of ``--preset best-oneshot-params`` by 5% at 25% and 3%
at 50% of the routed parameters, and raised it by 3% at a 23.4% split (``docs/benchmarks/quality.md``).
What cannot run one layer at a time is refused before any work: observers that need the whole model's loss
gradient (Fisher, HEAPr), allocations ranked across layers, EEP's search. ``ChooseRecipe`` streams each candidate
whole and measures its output (:mod:`moe_fx.run.stream_choose`).

An interrupted run resumes: shards and progress live in ``.<out>.partial`` (:mod:`moe_fx.formats.partial`),
the hidden states are saved there every ``snapshot_seconds``, and the same call again skips finished layers
(replaying those after the last saved states, without writing them). A family whose layers pass more than hidden
states between them (:mod:`moe_fx.model.layers`) saves no snapshot and replays every finished layer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_fx.calibrate import Calibrate, calibration_stats, check_host_memory, distributed, fits_on_gpu, instrument, keep_samples_on, reduce_across_ranks
from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import BadOptionError, NotAModelError, UnsupportedFamilyError, out_of_memory
from moe_fx.evaluate.nll import EvalSet, evaluate_nll
from moe_fx.evaluate.report import write_report
from moe_fx.formats import mxfp4
from moe_fx.formats.checkpoint import check_expert_storage, check_output_path, source_mxfp4, write_companions
from moe_fx.formats.lazy import LazyCheckpoint, meta_model, revert_to_checkpoint_names
from moe_fx.formats.loading import stored_buckets
from moe_fx.formats.partial import PartialCheckpoint, ShardWriter, host_copies
from moe_fx.formats.ragged import held_in_buckets, pad_block_, plan_storage, record_buckets, storage_summary
from moe_fx.formats.shards import tensor_bytes
from moe_fx.formats.stored_format import dense_config
from moe_fx.model.attention import calibration_attention
from moe_fx.model.layers import LayerCall, capture_layer_calls, decoder_layers, stand_in_output
from moe_fx.model.layout import layout_of, record_layout
from moe_fx.model.per_layer import LAYOUT_KEY, apply_layout, build_buckets, per_layer_class
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.trace import substituted, trace
from moe_fx.pipeline import STATE_ATTR, MoEState, Pass, PassRecord, compose, state_of
from moe_fx.plan.choose import ChooseRecipe
from moe_fx.plan.plans import ChannelPlan, PrunePlan
from moe_fx.progress import progress_bar
from moe_fx.rewrite.teacher_cache import TeacherCache
from moe_fx.score import Scores


@dataclass
class StreamReport:
    """What a streaming run did and what it cost."""

    out: Path
    state: MoEState
    """The run's record over all layers (spec, plan, scores), as an in-memory pipeline leaves it."""
    layers: int
    resumed_layers: int
    """Layers finished by an interrupted earlier run and not redone."""
    seconds: float
    peak_gpu_bytes: int | None
    """Peak CUDA memory allocated (None on the CPU)."""
    peak_cpu_bytes: int
    """Peak resident memory of the process."""
    layer_weight_bytes: int
    """The largest decoder layer's weights, as loaded."""
    hidden_state_bytes: int
    """The calibration windows' hidden states between two layers."""
    hidden_state_device: str
    """Where they were kept (``stream_prune``'s ``states``)."""
    phase_seconds: dict[str, float]
    """Set-up (meta model, embeddings, calibration windows), the layers, and the rest (head, config, record)."""


def _checked_passes(passes: Sequence[Pass]) -> tuple[Calibrate | None, list[Pass]]:
    """The calibration (first, if any) and the passes run per layer, each checked to be layer-local."""
    calibrate = passes[0] if passes and isinstance(passes[0], Calibrate) else None
    rest = list(passes[1:] if calibrate is not None else passes)
    for p in rest:
        if isinstance(p, Calibrate):
            raise BadOptionError("streaming calibrates once, before the other passes: put Calibrate first and only once")
        p.check_layerwise()
    if calibrate is not None:
        grads = [o.name for o in calibrate.make_observers() if o.needs_grads]
        if grads:
            raise BadOptionError(
                f"observers {grads} need the gradient of the whole model's loss (Fisher, HEAPr); streaming holds one layer at a "
                "time: use a forward-only method (experts: reap, frequency, shape, naee; channels: obs, activation, weight, coverage) or prune in memory"
            )
    return calibrate, rest


def _run_key(source: Path, passes: Sequence[Pass], fingerprint: str, dtype: torch.dtype, device: str, sequential: bool, expert_storage: str) -> str:
    desc = {"source": str(source.resolve()), "passes": [[p.name, p.config_dict()] for p in passes], "tokens": fingerprint,
            "dtype": str(dtype), "device": torch.device(device).type} | ({"sequential": True} if sequential else {})
    if expert_storage != "auto":
        desc["expert_storage"] = expert_storage
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _move_outside(model: nn.Module, layers_prefix: str, device: str | torch.device) -> None:
    """Move every parameter and buffer outside the decoder layers to ``device`` (tied parameters stay tied)."""
    moved: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name == layers_prefix or name.startswith(layers_prefix + "."):
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or t.is_meta:
                    continue
                if id(t) not in moved:
                    moved[id(t)] = nn.Parameter(t.data.to(device), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else t.to(device)
                table[key] = moved[id(t)]


def _peak_cpu_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _StreamRun:
    """One streaming run's working state: the meta model, the checkpoint, the hidden states."""

    def __init__(self, source: Path, ckpt: LazyCheckpoint, model: nn.Module, spec: MoEModelSpec, device: str, dtype: torch.dtype,
                 states: str) -> None:
        self.source, self.ckpt, self.model, self.spec = source, ckpt, model, spec
        self.device, self.dtype, self.states_option = device, dtype, states
        self.prefix, self.layers = decoder_layers(model, spec)
        self.layer_keys, self.rest_keys = ckpt.keys_by_layer(len(self.layers))
        self.calls: dict[tuple[int, ...], list[LayerCall]] = {}
        self.states: list[torch.Tensor] = []
        self.own: list[dict] = []
        """Per batch, the keyword arguments of its own (:func:`capture_layer_calls`): what the last layer run handed on
        (the spec's ``layer_carry``, kept where the states are) and the model's mutable per-forward containers."""
        self.state_device = torch.device("cpu")
        self.batch_shapes: list[tuple[int, ...]] = []
        self.layer_weight_bytes = 0
        self.mxfp4 = source_mxfp4(source) is not None
        """The source's experts are MXFP4: each layer is dequantized when read and written back in MXFP4."""
        self.mxfp4_errors: dict[str, float] = {}
        self.bucketed = stored_buckets(source)
        """The source's blocks stored in width buckets (their ``moe_fx_layout`` entries)."""

    def embed(self, groups: Sequence[torch.Tensor], batch_size: int) -> None:
        """Hidden states entering layer 0 for every batch of windows (batched within each group, e.g. per
        evaluation domain), and each batch shape's layer calls."""
        self._choose_state_device(sum(w.numel() for w in groups))
        _move_outside(self.model, self.prefix, self.device)
        try:
            for windows in groups:
                for i in range(0, windows.shape[0], batch_size):
                    batch = windows[i : i + batch_size].to(self.device)
                    hidden, calls, own = capture_layer_calls(self.model, self.layers, batch, self.spec.layer_carry)
                    self.calls.setdefault(tuple(batch.shape), calls)
                    self.batch_shapes.append(tuple(batch.shape))
                    self.states.append(self.store(hidden))
                    self.own.append(own)
        finally:
            _move_outside(self.model, self.prefix, "cpu")

    @property
    def layer_state(self) -> bool:
        """Whether layers pass more than hidden states between them (see :attr:`own`)."""
        return bool(self.spec.layer_carry) or any(self.own)

    def _choose_state_device(self, tokens: int) -> None:
        """``states="auto"``: keep the hidden states on the GPU while they take at most a quarter of its free
        memory (no copies); else (or ``"cpu"``) in pinned CPU memory, overwritten in place layer after layer
        (asynchronous copies)."""
        nbytes = tokens * self.model.config.get_text_config().hidden_size * self.dtype.itemsize
        on_gpu = self.states_option == "auto" and fits_on_gpu(self.device, nbytes)
        self.state_device = torch.device(self.device if on_gpu else "cpu")

    def store(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where the hidden states are kept."""
        if hidden.device.type == self.state_device.type:  # one GPU per run: "cuda" and "cuda:0" are the same
            return hidden
        pin = self.state_device.type == "cpu" and torch.device(self.device).type == "cuda"
        return torch.empty(hidden.shape, dtype=hidden.dtype, device=self.state_device, pin_memory=pin).copy_(hidden)

    def load_layer(self, index: int) -> None:
        layer = self.layers[index]
        self.ckpt.load_into(self.model, self.layer_keys[index], device=self.device, dtype=self.dtype)
        if index + 1 < len(self.layers):  # the next layer's bytes come off the disk while this one computes
            self.ckpt.read_ahead.start(self.layer_keys[index + 1])
        missing = [n for n, t in layer.state_dict().items() if t.is_meta]
        if missing:
            raise NotAModelError(f"{self.source}: the checkpoint has no tensor for {self.prefix}.{index}.{missing[0]} (and {len(missing) - 1} more)")
        self.layer_weight_bytes = max(self.layer_weight_bytes, tensor_bytes(layer.state_dict()))

    def pad_layer(self, index: int) -> None:
        """Give layer ``index``'s bucketed blocks (as loaded) their padded experts, which the passes read and rewrite:
        the tensors the in-memory ``load_model(..., ragged=False)`` holds, bit for bit."""
        inside = f"{self.prefix}.{index}."
        for path, block in self.bucketed.items():
            if path.startswith(inside):
                pad_block_(self.model, block)

    def blocks_of(self, index: int) -> MoEModelSpec:
        """The spec restricted to the MoE blocks of decoder layer ``index`` (none for a dense layer)."""
        inside = f"{self.prefix}.{index}."
        return dataclasses.replace(self.spec, blocks=tuple(b for b in self.spec.blocks if b.path.startswith(inside)))

    def forward(self, index: int, observers: list, spec: MoEModelSpec, hand_on: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Every batch's hidden states through layer ``index`` (replaced by its output, and the batch's carry updated,
        unless ``hand_on`` is False: observed only), observers attached."""
        layer = self.layers[index]
        with torch.no_grad(), (instrument(self.model, spec, observers) if spec.blocks and observers else contextlib.nullcontext()) as recorded:
            for b, (hidden, shape) in enumerate(zip(self.states, self.batch_shapes)):
                try:
                    own = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in self.own[b].items()}
                    out = self.calls[shape][index](layer, hidden.to(self.device, non_blocking=True), own)
                    if not hand_on:
                        continue
                    self.own[b] = {k: v.to(self.state_device) if isinstance(v, torch.Tensor) else v for k, v in own.items()}
                except torch.OutOfMemoryError:
                    raise out_of_memory(f"layer {index} of the streamed calibration", self.device, shape[:2],
                                        "lower --batch-size or --seq-len (the layer's weights stay on the device while its batches run)") from None
                if hidden.device.type == out.device.type:
                    self.states[b] = out
                else:  # the same stream reads the old values before this copy overwrites them
                    hidden.copy_(out, non_blocking=True)
            acc = recorded or {}
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return acc

    def layer_shard(self, index: int, spec: MoEModelSpec | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Layer ``index`` as its shard holds it (:meth:`_saved`); its blocks in ``spec`` whose experts have different
        widths in width buckets (:mod:`moe_fx.formats.ragged`; None: all padded). Also returns the layer's storage:
        the shape of every tensor written (model names), the buckets and the routed parameters ``[padded, stored]``."""
        buckets, padded, stored = plan_storage(self.model, spec) if spec is not None and spec.blocks else ({}, 0, 0)
        prefix = f"{self.prefix}.{index}."
        with held_in_buckets(self.model, buckets):
            tensors = {prefix + k: v for k, v in self.layers[index].state_dict().items()}
            saved = self._saved(tensors)
        storage = {"shapes": {k: list(v.shape) for k, v in tensors.items()}, "buckets": buckets, "routed_params": [padded, stored]}
        return saved, storage

    def write_rest(self, partial: PartialCheckpoint, shard: str) -> tuple[list[str], int]:
        """Write everything outside the decoder layers as the last shard; return its keys and bytes."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        inside = self.prefix + "."
        tensors = {k: v for k, v in self.model.state_dict().items() if not k.startswith(inside)}
        saved = self._saved(remove_tied_weights_from_state_dict(tensors, self.model))
        partial.write_shard(shard, host_copies(saved))
        return sorted(saved), tensor_bytes(saved)

    def _saved(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` in the checkpoint layout (names, MXFP4 packing) where the layer is: what a shard holds."""
        saved = revert_to_checkpoint_names(self.model, tensors)
        if self.mxfp4:  # packed where the layer is (the GPU): seconds a layer on the CPU
            saved, errors = mxfp4.pack_state(saved)
            self.mxfp4_errors.update(errors)
        return saved


def _layer_record(model: nn.Module, state: MoEState, keys: list[str], nbytes: int, storage: dict, seconds: dict[str, float]) -> dict:
    """What the final record and config need of one finished layer (JSON, kept in the progress file); ``storage``:
    :meth:`_StreamRun.layer_shard`'s."""
    scores = state.scores
    return {
        "keys": keys,
        "bytes": nbytes,
        **storage,
        "statistics": sorted({n for acc in (state.stats.per_block.values() if state.stats else []) for n in acc}),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "layout": layout_of(model, state.spec)["blocks"] if state.spec.blocks else {},
        "blocks": {b.path: [b.num_experts, b.experts.intermediate_size] for b in state.spec.blocks},
        "plan": state.plan.to_dict()["kept_experts"] if state.plan is not None else None,
        "channel_plan": state.channel_plan.to_dict() if state.channel_plan is not None else None,
        "scores": None if scores is None else {
            "method": scores.method, "granularity": scores.granularity, "comparable": scores.comparable_across_blocks,
            "per_block": {k: v.tolist() for k, v in scores.per_block.items()} if scores.granularity == "expert" else {},
            "per_expert": {k: v.tolist() for k, v in (scores.per_expert or {k: v.sum(1) for k, v in scores.per_block.items()}).items()}
            if scores.granularity == "channel" else None,
        },
        "history": [dataclasses.asdict(r) for r in state.history],
    }


def _merged_state(spec: MoEModelSpec, records: dict[int, dict], stats: CalibrationStats | None) -> MoEState:
    """One state over all layers from the per-layer records, as the in-memory pipeline would leave it."""
    sizes = {p: v for r in records.values() for p, v in r["blocks"].items()}
    blocks = tuple(
        dataclasses.replace(b, experts=dataclasses.replace(b.experts, num_experts=sizes[b.path][0], intermediate_size=sizes[b.path][1]))
        if b.path in sizes else b
        for b in spec.blocks
    )
    ordered = [records[i] for i in sorted(records)]
    state = MoEState(spec=dataclasses.replace(spec, blocks=blocks), original_spec=spec, stats=stats)
    kept = {p: k for r in ordered if r["plan"] for p, k in r["plan"].items()}
    # a layer that dropped none (channel pruning left every expert some) keeps all, as the in-memory plan says
    state.plan = PrunePlan({b.path: kept.get(b.path, list(range(b.num_experts))) for b in spec.blocks}) if kept else None
    channel = [ChannelPlan.from_dict(r["channel_plan"]) for r in ordered if r["channel_plan"]]
    if channel:
        state.channel_plan = ChannelPlan({p: k for c in channel for p, k in c.kept_channels.items()}, channel[0].multiple, channel[0].align)
    scored = [r["scores"] for r in ordered if r["scores"]]
    if scored:
        first = scored[0]
        table = lambda key: {p: torch.tensor(v, dtype=torch.float64) for s in scored for p, v in (s[key] or {}).items()}
        state.scores = Scores(first["method"], table("per_block"), first["granularity"], table("per_expert") or None, first["comparable"])
    passes = [r["history"] for r in ordered if r["history"]]
    for j, rec in enumerate(passes[0] if passes else []):
        per_layer = [h[j] for h in passes]
        state.history.append(PassRecord(rec["name"], rec["config"], sum(h["seconds"] for h in per_layer),
                                        any(h["modified"] for h in per_layer), _merged_report([h["report"] for h in per_layer])))
    return state


def _merged_report(reports: list[dict]) -> dict:
    """One pass's per-layer reports as the whole-model report: per-block tables joined, counts added, means
    averaged over layers, anything else as the first layer had it."""
    out = {}
    for key, first in reports[0].items():
        values = [r[key] for r in reports if r.get(key) is not None]
        if isinstance(first, dict):
            out[key] = {k: v for r in values for k, v in r.items()}
        elif isinstance(first, bool) or not isinstance(first, (int, float)):
            out[key] = first
        elif isinstance(first, int):
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _check_loads_back(model: nn.Module, layers: dict[int, dict], prefix: str) -> None:
    """Refuse to finish a checkpoint whose config (as ``model.config`` now says) would not build the tensors the layers
    were written with, at their shapes: what loading it needs (width buckets included)."""
    base = getattr(type(model), "moe_fx_base", type(model))
    with torch.device("meta"):
        ref = per_layer_class(base)(copy.deepcopy(model.config))
    recorded = {i: r["shapes"] for i, r in layers.items() if "shapes" in r}  # a layer an older version wrote has none
    written = {n: s for shapes in recorded.values() for n, s in shapes.items()}
    prefixes = tuple(f"{prefix}.{i}." for i in recorded)
    want = {n: list(t.shape) for n, t in ref.state_dict().items() if n.startswith(prefixes)}
    bad = sorted(n for n in want.keys() | written.keys() if want.get(n) != written.get(n))
    if bad:
        raise UnsupportedFamilyError(f"the streamed layers would not load back with the config written for them: tensors {bad[:3]} "
                                     "differ; write the experts padded (--expert-storage padded)")


def stream_prune(
    source: str | Path,
    out: str | Path,
    passes: Sequence[Pass],
    *,
    device: str = "cpu",
    dtype: str = "auto",
    tokenizer=None,
    overwrite: bool = False,
    show_progress: bool = True,
    snapshot_seconds: float = 300.0,
    states: str = "cpu",
    extra_record: dict | None = None,
    report: bool = True,
    teacher_cache: str | Path | None = None,
    teacher_top_k: int = 64,
    sequential: bool = False,
    expert_storage: str = "auto",
) -> StreamReport | None:
    """Run ``passes`` (``Calibrate`` first, then layer-local passes) on the checkpoint at ``source`` one decoder
    layer at a time, writing the pruned checkpoint to ``out`` (see the module doc). ``snapshot_seconds``: how
    often the hidden states are saved for a resume (0: after every layer); ``states``: where the hidden states
    between layers are kept: ``cpu`` (pinned, copied asynchronously; as fast as ``auto`` on an H100 in
    ``benchmarks/streaming.py``, with the least GPU memory) or ``auto`` (on the GPU when they take at most a
    quarter of its free memory); ``report``: also write ``report.md`` / ``report.json`` / ``plots/`` (as
    :func:`~moe_fx.formats.save_checkpoint` does); ``teacher_cache``: also cache the unpruned model's top-``teacher_top_k``
    next-token distributions on the calibration windows in that directory, for ``Distill(teacher=<that directory>)``
    on the pruned output afterwards (:mod:`moe_fx.rewrite.teacher_cache`; one process only); ``sequential``: hand the
    next layer the *rewritten* layer's output (one more forward of each layer), so every layer is calibrated, scored
    and compensated on the hidden states the pruned model will feed it, not the unpruned model's; ``expert_storage``: as
    :func:`~moe_fx.formats.save_checkpoint`'s, decided layer by layer (a layer's buckets must save 2% of its routed
    parameters; an MXFP4 source is written padded).

    Under torch.distributed (torchrun) every rank holds the current layer and the hidden states of its share
    of the calibration windows; each layer's statistics are reduced across ranks before rank 0 alone runs the
    passes and writes (the others return None). A resumed distributed run replays from the first layer (no
    hidden-state snapshots: each rank's are its own), writing only the layers not finished.

    A :class:`~moe_fx.passes.ChooseRecipe` among ``passes`` streams each of its candidates to its own output and keeps
    the one whose output predicts the held-out windows best (:func:`~moe_fx.run.stream_choose.stream_choose`)."""
    from transformers import GenerationConfig

    if any(isinstance(p, ChooseRecipe) for p in passes):  # each candidate streamed through this function, then measured
        from moe_fx.run.stream_choose import stream_choose

        return stream_choose(source, out, passes, overwrite=overwrite, show_progress=show_progress, report=report, device=device,
                             dtype=dtype, tokenizer=tokenizer, snapshot_seconds=snapshot_seconds, states=states, extra_record=extra_record,
                             teacher_cache=teacher_cache, teacher_top_k=teacher_top_k, sequential=sequential, expert_storage=expert_storage)
    t0 = time.perf_counter()
    source = Path(source)
    calibrate, rest = _checked_passes(passes)
    if sequential and distributed.active():
        raise BadOptionError("sequential streaming runs each rewritten layer again, and only rank 0 rewrites: use one process")
    if sequential and teacher_cache is not None:
        raise BadOptionError("the teacher cache is the unpruned model's output, and a sequential run carries the pruned model's "
                             "hidden states: drop one of them")
    if teacher_cache is not None and (calibrate is None or distributed.active()):
        raise BadOptionError("teacher_cache needs a Calibrate pass (its windows are what the teacher is cached on) and a single process")
    if states not in ("auto", "cpu"):
        raise BadOptionError(f"states={states!r}: use 'auto' or 'cpu'")
    check_expert_storage(expert_storage)
    out = check_output_path(out, source, overwrite)
    main, ranks = distributed.is_main(), distributed.active()
    with LazyCheckpoint(source) as ckpt, contextlib.ExitStack() as calibrating:
        run = _open_meta(source, ckpt, device, dtype, states)
        model, spec, dt = run.model, run.spec, run.dtype
        ragged = expert_storage == "auto" and not run.mxfp4
        calibrating.enter_context(calibration_attention(model))  # from the embedding (masks are built there) to the last layer
        compose(*passes).check_model(model)  # what the family cannot take fails before any layer is read
        if calibrate is not None:
            check_host_memory(spec, calibrate.make_observers(), streamed=True)
        tokens = calibrate.tokens(model) if calibrate is not None else None
        key = _run_key(source, passes, tokens.fingerprint if tokens is not None else "", dt, device, sequential, expert_storage)
        partial = PartialCheckpoint(out, key, discard_other_runs=overwrite) if main else None
        writer = calibrating.enter_context(contextlib.closing(ShardWriter(partial))) if main else None
        n = len(run.layers)
        shards = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        resumed = distributed.broadcast_object(partial.resumed if main else None)
        start = n if resumed == n else (resumed if tokens is None else 0)
        if start < n and tokens is not None:
            run.embed([distributed.shard(tokens.input_ids)], calibrate.batch_size)
            # a snapshot holds hidden states only: a family passing more between layers resumes by replaying them
            snapshot = partial.load_states() if resumed and not ranks and not run.layer_state else None
            if snapshot is not None and snapshot[0] <= resumed:
                start, run.states = snapshot[0], [run.store(s.to(run.state_device)) for s in snapshot[1]]
            if sequential:  # a finished layer replays from the source, unpruned: the layers after the snapshot are redone
                resumed = start
        hidden_bytes = sum(s.numel() * s.element_size() for s in run.states)
        last_snapshot = t_layers = time.perf_counter()
        with progress_bar("stream", total=n, unit="layer", enabled=show_progress and main) as bar:
            bar.update(start)
            for i in range(start, n):
                layer_spec = run.blocks_of(i)
                t_load = time.perf_counter()
                run.load_layer(i)
                run.pad_layer(i)
                t_fwd = time.perf_counter()
                observers = calibrate.make_observers() if calibrate is not None else []
                keep_samples_on(layer_spec, observers, device)
                # sequential: the unpruned layer is only observed; the rewritten one runs again below and hands on its output
                rewritten_hands_on = sequential and tokens is not None and bool(layer_spec.blocks) and bool(rest)
                acc = run.forward(i, observers, layer_spec, hand_on=not rewritten_hands_on)
                if ranks and layer_spec.blocks and observers:
                    reduce_across_ranks(acc, layer_spec, observers)
                t_pass = time.perf_counter()
                if i < resumed or not main:  # finished by an interrupted run, or rank 0 writes it: only its output is needed
                    run.layers[i].to("meta")
                    bar.update(1)
                    continue
                sub = MoEState(spec=layer_spec, original_spec=layer_spec, layout_deferred=True)
                if tokens is not None:
                    sub.stats = calibration_stats(acc, tokens, t_pass - t_fwd)
                if layer_spec.blocks and rest:
                    object.__setattr__(model, STATE_ATTR, sub)
                    compose(*rest)(model)
                if rewritten_hands_on:
                    run.forward(i, [], layer_spec)
                t_write = time.perf_counter()
                saved, storage = run.layer_shard(i, sub.spec if ragged else None)
                record = _layer_record(model, sub, sorted(saved), tensor_bytes(saved), storage, {
                    "load": t_fwd - t_load, "forward": t_pass - t_fwd, "passes": t_write - t_pass, "write": time.perf_counter() - t_write})
                run.layers[i].to("meta")
                writer.submit(i, shards[i], saved, record)  # written while the next layer loads and computes
                if not ranks and not run.layer_state and i + 1 < n and time.perf_counter() - last_snapshot >= snapshot_seconds:
                    partial.save_states(i + 1, [s.cpu() for s in run.states])
                    last_snapshot = time.perf_counter()
                bar.update(1)
        if writer is not None:
            writer.drain()
        calibrating.close()
        if not main:
            return None
        if teacher_cache is not None:
            _teacher_pass(run, tokens.input_ids, teacher_cache, teacher_top_k, device, show_progress)
        t_rest = time.perf_counter()
        for record in partial.layers.values():
            if record["layout"]:
                apply_layout(model, {"blocks": record["layout"]})
        weight_map = {k: shards[i] for i, r in partial.layers.items() for k in r["keys"]}
        rest_keys, rest_bytes = run.write_rest(partial, shards[n])
        weight_map.update(dict.fromkeys(rest_keys, shards[n]))
        total = sum(r["bytes"] for r in partial.layers.values()) + rest_bytes
        stats = None
        if tokens is not None:
            stats = dataclasses.replace(
                calibration_stats({}, tokens, sum(r["seconds"]["forward"] for r in partial.layers.values())),
                released=tuple(sorted({n for r in partial.layers.values() for n in r["statistics"]})),
            )
        state = _merged_state(spec, partial.layers, stats)
        if calibrate is not None:
            state.history.insert(0, PassRecord(calibrate.name, calibrate.config_dict(), stats.seconds, False, stats.summary()))
        object.__setattr__(model, STATE_ATTR, state)
        record_layout(model, state.spec)
        buckets = {p: r for layer in partial.layers.values() for p, r in (layer.get("buckets") or {}).items()}
        if buckets:
            record_buckets(model, state.spec, buckets)
        _check_loads_back(model, partial.layers, run.prefix)
        with dense_config(model.config) if run.ckpt.format is not None else contextlib.nullcontext():  # read dense, written dense
            model.config.save_pretrained(partial.dir)
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(source).save_pretrained(partial.dir)
        summary = StreamReport(
            out=out, state=state, layers=n, resumed_layers=resumed,
            seconds=time.perf_counter() - t0,
            peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None,
            peak_cpu_bytes=_peak_cpu_bytes(), layer_weight_bytes=run.layer_weight_bytes, hidden_state_bytes=hidden_bytes,
            hidden_state_device=str(run.state_device),
            phase_seconds={"setup": t_layers - t0, "layers": t_rest - t_layers, "finish": time.perf_counter() - t_rest},
        )
        streaming = {"layers": n, "resumed_layers": summary.resumed_layers, "seconds": round(summary.seconds, 3),
                     "peak_gpu_bytes": summary.peak_gpu_bytes, "peak_cpu_bytes": summary.peak_cpu_bytes,
                     "layer_weight_bytes": summary.layer_weight_bytes, "hidden_state_bytes": hidden_bytes,
                     "hidden_state_device": summary.hidden_state_device,
                     "phase_seconds": {k: round(v, 3) for k, v in summary.phase_seconds.items()},
                     "per_layer_seconds": {i: r["seconds"] for i, r in sorted(partial.layers.items())}}
        extra = {"streaming": streaming, **(extra_record or {})}
        if buckets:
            padded, stored = (sum(r["routed_params"][j] for r in partial.layers.values()) for j in (0, 1))
            extra["expert_storage"] = storage_summary(padded, stored, buckets)
        if run.mxfp4:  # errors of layers an interrupted run finished are not known to this one
            extra["expert_format"] = {"format": "mxfp4", "tensors": len(run.mxfp4_errors), "bytes": total,
                                      "max_relative_error": max(run.mxfp4_errors.values(), default=0.0)}
        record = write_companions(model, partial.dir, source=source, tokenizer=tokenizer, extra_record=extra)
        if report:
            write_report(partial.dir, record, location=out)
        partial.complete(weight_map, total)
    return summary


def _open_meta(source: Path, ckpt: LazyCheckpoint, device: str, dtype: str, states: str = "cpu", *, evaluate: bool = False) -> _StreamRun:
    """A meta model of the checkpoint with the tensors outside its layers loaded (on the CPU). Experts stored in width
    buckets are held so, to be read as stored (:meth:`_StreamRun.pad_layer` pads a loaded layer's). ``evaluate``: only
    run (no pass reads the spec's blocks), so a checkpoint with substituted experts, which ``trace`` refuses, opens
    with the layer structure of its stock model."""
    model = meta_model(source, dtype, device)  # padded: what the spec is traced from
    dt = next(model.parameters()).dtype
    spec = _stock_spec(model) if evaluate and substituted(model) else state_of(model).spec
    run = _StreamRun(source, ckpt, model, spec, device, dt, states)
    for block in run.bucketed.values():
        build_buckets(model, block["buckets"])
    ckpt.load_into(model, run.rest_keys, device="cpu", dtype=dt)
    model.tie_weights()
    return run


def _stock_spec(model: nn.Module) -> MoEModelSpec:
    """The spec of the stock model ``model``'s config describes without its per-layer layout (built on meta): the
    decoder layers and what they hand on, for a model whose own experts ``trace`` refuses."""
    config = copy.deepcopy(model.config)
    delattr(config, LAYOUT_KEY)
    with torch.device("meta"):
        return trace(getattr(type(model), "moe_fx_base", type(model))(config))


def stream_evaluate(source: str | Path, eval_set: EvalSet, *, device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                    show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Per-domain NLL of the checkpoint at ``source`` (as :func:`~moe_fx.evaluate.evaluate_nll`), one decoder
    layer in memory at a time: the windows' hidden states go through the layers as in :func:`stream_prune`,
    then the model's own forward runs with its layers standing in for the last layer's stored outputs, so the
    final norm, head and loss are the model's."""
    source = Path(source)
    with LazyCheckpoint(source) as ckpt:
        run = _open_meta(source, ckpt, device, dtype, evaluate=True)
        run.embed(list(eval_set.windows.values()), batch_size)  # batched per domain, as evaluate_nll does
        with progress_bar("stream eval", total=len(run.layers), unit="layer", enabled=show_progress) as bar:
            for i in range(len(run.layers)):
                run.load_layer(i)
                run.forward(i, [], run.blocks_of(i))
                run.layers[i].to("meta")
                bar.update(1)
        with _layers_replaying(run, iter(run.states), device) as model:
            return evaluate_nll(model, eval_set, batch_size=batch_size, show_progress=show_progress)


@contextlib.contextmanager
def _layers_replaying(run: _StreamRun, finals: Iterator[torch.Tensor], device: str | torch.device) -> Iterator[nn.Module]:
    """The model, on ``device`` outside its decoder layers, with the layers standing in for outputs a streamed pass
    stored: each passes its input on and the last returns the next of ``finals``, so a forward's final norm, head
    and loss are the model's own, for any family."""
    last, carry = len(run.layers) - 1, run.spec.layer_carry
    for j, layer in enumerate(run.layers):
        layer.forward = ((lambda h, *a, **k: stand_in_output(h, carry)) if j < last
                         else (lambda h, *a, **k: stand_in_output(next(finals).to(device), carry)))
    _move_outside(run.model, run.prefix, device)
    try:
        yield run.model
    finally:
        for layer in run.layers:
            layer.__dict__.pop("forward", None)


@torch.no_grad()
def _teacher_pass(run: _StreamRun, windows: torch.Tensor, path: str | Path, top_k: int, device: str, show_progress: bool) -> TeacherCache:
    """The unpruned model's top-k next-token distributions on the calibration ``windows``, cached at ``path``: the
    streamed calibration carried the windows' hidden states through every layer before it was pruned, so the
    model's forward over those final states (one window at a time: the logits of one window are the memory it
    needs) gives the teacher's logits without the teacher ever being whole in memory."""
    if len(run.states) == 0:
        raise BadOptionError("the teacher cache needs this run's hidden states; a finished earlier run left none: pass --overwrite to run again")
    cache = TeacherCache.create(path, windows, top_k)
    finals = (s[r : r + 1] for s in run.states for r in range(s.shape[0]))
    with _layers_replaying(run, finals, device) as model, progress_bar("teacher", total=windows.shape[0], unit="window", enabled=show_progress) as bar:
        for w in range(windows.shape[0]):
            cache.write(slice(w, w + 1), model(input_ids=windows[w : w + 1].to(device), use_cache=False).logits)
            bar.update(1)
    _move_outside(run.model, run.prefix, "cpu")
    cache.finish(source="streamed prune: the unpruned model's final hidden states")
    return cache
