"""``moe-fx prune``: calibrate, score and drop experts (or channels inside experts), optionally compensate and
distill, in memory or streamed layer by layer; save a checkpoint with its record and report and print before/after."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import torch

from moe_fx.cli.common import (
    add_common,
    add_data,
    add_eval,
    add_generation,
    calibration_and_eval,
    check_language_model,
    check_token_ids,
    generation_rows,
    resolve_device,
    span,
    task_dir,
    task_rows,
    zero_shot_results,
)
from moe_fx.errors import BadOptionError, MoeFxError
from moe_fx.formats.checkpoint import EXPERT_STORAGE
from moe_fx.formats.compressed_experts import DEFAULT_GROUP
from moe_fx.formats.fp8_block import BLOCK as FP8_BLOCK
from moe_fx.formats.quantized_checkpoint import SCHEMES, TARGETS, check_before_pruning, partial_blocks_note, quantize_in_place
from moe_fx.formats.stored_format import stored_format
from moe_fx.plan.plans import WIDTH_ALIGN


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    from moe_fx.run.presets import PRESET_DEFAULTS, PRESET_OPTIONS, PRESETS

    p = sub.add_parser("prune", help="calibrate, score and drop experts (or channels inside experts); save a checkpoint")
    p.add_argument("model", help="source checkpoint directory (never modified)")
    p.add_argument("--granularity", default="expert", choices=("expert", "channel"),
                   help="expert: drop whole experts; channel: remove intermediate channels inside the experts (default expert)")
    p.add_argument("--method", help="expert scoring: reap (default), shape, naee, frequency, random; or eep (evolutionary search "
                   "warm-started from --eep-warm-start); a merge- prefix (merge-reap) is the same as --merge; ream: REAP's "
                   "choice, each dropped expert averaged into a group around a salient kept one (REAM, arXiv 2604.04356); mone: the experts of "
                   "least substitution error replaced by their mean output, the router kept whole (MoNE, arXiv 2507.00390). "
                   "channel scoring (--granularity channel): fisher (default in memory), heapr, obs (default streamed: gradient-free), coverage, activation, weight")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="the measured best recipe, instead of choosing --method/--allocation/--compensate/--distill-steps: best-oneshot "
                        "(EEP global + compensation; REAP + compensation when streamed), best (best-oneshot + 300 distillation steps "
                        "of 32 windows on 1M calibration tokens), or best-oneshot-params (--ratio of the routed experts' parameters: "
                        "about half of it as whole experts by REAP, the rest as channels by obs, + compensation; --sequential when streamed)")
    p.add_argument("--merge", action="store_true", help="fold each dropped expert into its most similar kept expert instead of discarding it")
    p.add_argument("--compensate", action="store_true",
                   help="after dropping, refit the kept experts' down projections (ridge least squares) to reproduce each block's original output")
    p.add_argument("--ridge", type=float, default=1.0, help="--compensate: pull towards the current weights, relative to each expert's activation energy (default 1.0)")
    p.add_argument("--search-samples", type=int, default=1024, help="naee, shape, merge-*: calibration tokens per layer kept with every "
                   "expert's output (samples x experts x hidden floats a layer; default 1024)")
    p.add_argument("--compensate-samples", type=int, default=16384,
                   help="--compensate: calibration tokens per layer it fits on (default 16384; 65536, what --preset takes, measured "
                        "better on qwen3moe-bench at 4x the memory)")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="after pruning, fine-tune the routed experts and routers towards the unpruned model's logits (KL) for this many "
                        "steps of --distill-batch-size calibration windows (moe_fx.passes.Distill; default 0: off). Holds the source model in memory too")
    p.add_argument("--distill-lr", type=float, default=None,
                   help="--distill-steps: peak AdamW learning rate (default 3e-4; 3e-3 with --distill-train adapters)")
    p.add_argument("--distill-batch-size", type=int, default=None,
                   help="--distill-steps: calibration windows per optimizer step (default: --batch-size); each step runs in parts of "
                        "--batch-size windows with their gradients summed, so activation memory stays that of --batch-size")
    p.add_argument("--distill-teacher", default="model", choices=("model", "cached"),
                   help="--distill-steps: model (the source model in memory beside the student; full-vocabulary KL) or cached (the "
                        "unpruned model's top-k distributions cached to disk before pruning: the teacher is never held beside the student)")
    p.add_argument("--distill-train", default=None, choices=("experts", "routers", "adapters", "all"),
                   help="--distill-steps: what moves: the routed experts and routers (default; with --preset best, adapters where the "
                        "experts' training state would not fit the device and theirs does), the routers alone (least memory), adapters "
                        "(rank --distill-rank updates of the experts' weights, and the routers, folded into the weights at the end: a "
                        "stock checkpoint, a few percent of the experts' training state), or all")
    p.add_argument("--distill-rank", type=int, default=16, help="--distill-train adapters: rank of each expert's weight update (default 16)")
    p.add_argument("--distill-top-k", type=int, default=64, help="--distill-teacher cached: tokens kept per position (default 64)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "global", "layer", "expert", "buckets", "buckets-per-layer", "coverage"),
                   help="experts: uniform (same count in every layer; stock config) or global (ranked across layers; per-layer format). "
                   "channels: uniform (same width everywhere; stock config), layer (one width per layer), expert (HEAPr-style "
                   "global ranking, a width per expert, stored zero-padded), buckets (the same ranking, at most 4 widths per layer, "
                   "stored at those widths: loads through moe_fx.load or trust_remote_code), buckets-per-layer (buckets with each layer "
                   "removing --ratio of its own channels: streams) or coverage (Ding et al. score coverage)")
    chan = p.add_argument_group("channel pruning (--granularity channel)")
    chan.add_argument("--multiple", type=int, default=64, help="per-expert widths are padded to the layer's widest, rounded up to this (default 64)")
    chan.add_argument("--expert-storage", choices=EXPERT_STORAGE, default="auto",
                      help="experts of different widths in a layer: auto stores them in up to 4 width buckets where that saves 2%% "
                           "of the routed parameters or more (loads through moe_fx.load or trust_remote_code); padded stores them "
                           "zero-padded to the layer's widest (a stock checkpoint where the config can describe it)")
    chan.add_argument("--expert-ratio", type=float, help="first drop this fraction of each layer's experts (scored by --expert-method), then --ratio of the kept experts' channels")
    chan.add_argument("--expert-method", default="reap", help="expert scoring for --expert-ratio (default reap)")
    chan.add_argument("--expert-shares", type=float, nargs="+", metavar="SHARE",
                      help="--preset best-oneshot-params: shares of --ratio removed as whole experts (the rest as channels) to try "
                           "(those landing within 2 points of --ratio); the split with the lowest NLL on --fitness-tokens "
                           "held-out calibration tokens is kept (default 0 0.5 1; streamed, each split is streamed to its own output "
                           "and measured there). One share fixes the split")
    eep = p.add_argument_group("eep search (--method eep)")
    eep.add_argument("--eep-warm-start", default="reap", help="scorer whose plan seeds the search (default reap)")
    eep.add_argument("--eep-population", type=int, default=16, help="plans per generation (default 16)")
    eep.add_argument("--eep-generations", type=int, default=20, help="generations (default 20)")
    eep.add_argument("--eep-max-seconds", type=float, help="stop the search after this many seconds")
    eep.add_argument("--fitness-tokens", type=int, default=16384,
                     help="calibration tokens held out as the fitness set of the search, and of --preset best-oneshot-params' choice "
                          "of split (default 16384)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of each block's experts to drop, in (0, 1); with --granularity channel: "
                        "fraction of the routed experts' channels (= routed-FFN parameters) to remove")
    budget.add_argument("--keep", type=int, help="experts to keep per block")
    add_data(p)
    p.add_argument("--compiled-calibration", action="store_true",
                   help="record the calibration statistics inside the torch.compile graph (moe_fx.deliver.graph; CUDA graphs on GPU): the "
                        "same statistics as the default hooks, several times faster on a GPU; routing/REAP/channel-activation "
                        "statistics only (not --merge, --compensate, search scorers or gradient scorers)")
    p.add_argument("--quantize", choices=(*SCHEMES, "none"),
                   help="write the pruned routed experts quantized: fp8-block (float8_e4m3fn, one scale per 128 x 128 block: the "
                        "hub's format) or int8-channel / int4-group (compressed-tensors' formats); every other weight "
                        "keeps its dtype; a streamed prune's output is quantized shard by shard after it is written. A source "
                        "stored in one of these formats keeps it by default (its scheme, group size and targets); none writes "
                        "the pruned checkpoint dense")
    p.add_argument("--quantize-group-size", type=int,
                   help=f"inputs per scale of --quantize int4-group (default {DEFAULT_GROUP}, or the source's; must divide every "
                        "expert's input size)")
    p.add_argument("--quantize-targets", choices=TARGETS,
                   help="what --quantize covers: experts (the default: the routed experts only) or linear (also attention, shared "
                        "experts and dense MLPs, as the hub's FP8 checkpoints store them; routers and the LM head keep their dtype) "
                        "or linear+head (also the LM head, where it is not tied to the embeddings)")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="prune one decoder layer at a time, never holding the whole model: on, off, or auto (default: on when "
                        "the checkpoint's weights exceed 80%% of the device's free memory); forward-only methods with uniform allocation")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="streamed: calibrate, score and compensate each layer on the hidden states of the pruned layers before it "
                        "(one more forward of each layer) instead of the unpruned model's (default: off; on in --preset "
                        "best-oneshot-params streamed, --no-sequential to turn it off)")
    p.add_argument("--nproc", type=int, default=1, help="calibrate with this many processes on this host (runs torchrun; "
                   "or launch `torchrun --nproc-per-node N -m moe_fx prune ...` yourself)")
    add_eval(p)
    add_generation(p, "--eval-generate")
    add_common(p)
    p.set_defaults(parser_defaults={o: p.get_default(o) for o in PRESET_OPTIONS + PRESET_DEFAULTS})  # what --preset compares against


def _apply_preset(args, stream: bool, meta=None, device: str | None = None) -> None:
    """Set the options ``--preset`` stands for (moe_fx.run.presets), refusing options of the preset's set beside it,
    and fitted to the model ``meta`` (its structure; None: taken as is) where it cannot take them all, and to the
    memory of ``device`` (None: not checked) where trying several splits would not fit."""
    from moe_fx.calibrate import distributed
    from moe_fx.pipeline import state_of
    from moe_fx.run.presets import PRESET_OPTIONS, PRESETS, feasible_splits, fit_to_model, near_budget, preset_options, split_budget
    from moe_fx.run.recipe import bucket_candidates, split_label

    set_beside = [f"--{o.replace('_', '-')}" for o in PRESET_OPTIONS if getattr(args, o) != args.parser_defaults[o]]
    if set_beside:
        raise MoeFxError(f"--preset {args.preset} chooses {', '.join(set_beside)} itself: drop {'them' if len(set_beside) > 1 else 'it'} "
                         "or the preset")
    preset = PRESETS[args.preset]
    if args.expert_shares is not None:
        given = f"--expert-shares {' '.join(map(str, args.expert_shares))}"
        if preset.experts_share is None or not all(0 <= x <= 1 for x in args.expert_shares):
            raise MoeFxError(f"{given}: give shares in [0, 1] with --preset best-oneshot-params")
        if stream and args.nproc > 1 and len(args.expert_shares) > 1:
            raise MoeFxError(f"{given}: with --nproc only rank 0 writes, so a streamed prune cannot measure each split; give one share")
    if preset.experts_share is not None and not (args.ratio is not None and 0 < args.ratio < 1):
        raise MoeFxError(f"--preset {args.preset} removes --ratio of the routed experts' parameters: give --ratio in (0, 1)"
                         + (", not --keep" if args.keep is not None else f", not {args.ratio}"))
    chosen, fitted, machine = preset_options(args.preset, streamed=stream), [], None
    if meta is not None:
        chosen, fitted = fit_to_model(chosen, **_model_limits(meta))
    if preset.experts_share is not None and chosen.get("granularity") == "channel":
        args.params_ratio = args.ratio  # what the user asked for, kept in the record beside the two it splits into
        shapes = {(b.num_experts, b.experts.intermediate_size, b.router.n_group or 1) for b in state_of(meta).spec.blocks} if meta is not None else set()
        shape = shapes.pop() if len(shapes) == 1 else None
        several = preset.experts_shares and not (stream and args.nproc > 1)
        shares = args.expert_shares or (preset.experts_shares if several else (preset.experts_share,))
        if stream and args.nproc > 1 and not args.expert_shares:
            fitted.append("the split fixed at about half: with --nproc only rank 0 writes, so no split can be streamed and measured")
        splits = list(dict.fromkeys(split_budget(args.ratio, share, shape) for share in shares))  # shares that round alike are tried once
        if meta is not None and len(splits) > 1:
            splits = feasible_splits(state_of(meta).spec, splits)
        if shape is not None and len(splits) > 1:
            splits = near_budget(splits, args.ratio, shape)
        too_big = (None if len(splits) < 2 or meta is None else _split_choice_disk(meta, args.ratio, args.out) if stream
                   else _split_choice_memory(meta, args.ratio, device) if device else None)
        if too_big:
            splits = [split_budget(args.ratio, preset.experts_share, shape)]
            machine = f"the split fixed at about half: {too_big}"
        if len(splits) > 1:
            args.split_candidates = splits
            # channels alone with per-expert widths in buckets is tried too (the checkpoint stores its budget only in buckets)
            args.bucket_candidate = (args.expert_storage == "auto" and not args.quantize and not args.expert_shares and meta is not None
                                     and all(b.experts.call_style == "routed" for b in state_of(meta).spec.blocks))
        # with several splits, one with channels stands in until ChooseRecipe has kept one (the record then names it)
        chosen["expert_ratio"], chosen["ratio"] = args.params_split = next((s for s in splits if s[1]), splits[0])
        if not chosen["ratio"]:  # the whole budget as experts: an expert prune by the preset's expert scorer
            chosen.update(granularity="expert", method=chosen["expert_method"], ratio=chosen["expert_ratio"], expert_ratio=None)
    if args.sequential is False:  # said explicitly: the preset's streamed variant runs without it
        chosen.pop("sequential", None)
    if chosen.get("sequential") and args.nproc > 1:
        chosen.pop("sequential")
        fitted.append("no --sequential: with --nproc only rank 0 rewrites a layer, so no rank could run it again")
    args.preset_took = []
    for key, value in preset.defaults.items():  # data budgets: the preset's unless given
        if getattr(args, key) == args.parser_defaults[key]:
            chosen[key] = value
            args.preset_took.append(key)
    for key, value in chosen.items():
        setattr(args, key, value)
    if distributed.is_main():
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:.4g}" if isinstance(v, float) else f" {v}") for k, v in chosen.items()
                         if not (k in ("expert_ratio", "ratio") and getattr(args, "split_candidates", None)))
        print(f"moe-fx: --preset {args.preset}{' (streamed)' if stream else ''}: {flags} ({preset.streamed_measured if stream else preset.measured})")
        if getattr(args, "split_candidates", None):
            labels = [*map(split_label, args.split_candidates), *(bucket_candidates(args.params_ratio, stream) if args.bucket_candidate else [])]
            print(f"moe-fx: --preset {args.preset}: tries {len(labels)} splits{' (each streamed to its own output)' if stream else ''}"
                  f" and keeps the one with the lowest NLL on {args.fitness_tokens:,} held-out calibration tokens: " + "; ".join(labels))
        for line in fitted:
            print(f"moe-fx: --preset {args.preset} fitted to this model: {line}")
        if machine:
            print(f"moe-fx: --preset {args.preset} fitted to this machine: {machine}")


def _split_choice_memory(meta, ratio: float, device: str) -> str | None:
    """Why the splits of ``--preset best-oneshot-params`` cannot all be tried in ``device``'s free memory (None: they
    can): each candidate holds its pruned copy of the routed experts, up to ``1 - ratio`` of them, beside the model."""
    from moe_fx.calibrate import host_memory_available

    weights, routed = _weight_bytes(meta)
    copy = int(routed * (1 - ratio))
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else host_memory_available()
    if free is None or weights + copy <= 0.9 * free:
        return None
    return (f"trying the splits holds a pruned copy of the experts ({copy / 1e9:.1f} GB) beside the model ({weights / 1e9:.1f} GB), "
            f"more than 90% of {device}'s free {free / 1e9:.1f} GB")


def _weight_bytes(meta) -> tuple[int, int]:
    """``(all weights, routed experts' weights)`` of ``meta`` in bytes, in its dtype."""
    from moe_fx.pipeline import state_of
    from moe_fx.rewrite.prune_channels import routed_parameters

    width = next(meta.parameters()).element_size()
    return sum(p.numel() for p in meta.parameters()) * width, routed_parameters(meta, state_of(meta).spec) * width


def _split_choice_disk(meta, ratio: float, out: str | Path) -> str | None:
    """Why the splits of ``--preset best-oneshot-params`` cannot all be streamed beside ``out`` (None: they can): a
    streamed choice keeps the best candidate's output while it writes the next, each about the source less ``ratio``
    of its routed experts."""
    weights, routed = _weight_bytes(meta)
    output = weights - int(routed * ratio)
    where = next(p for p in Path(out).resolve().parents if p.exists())
    free = shutil.disk_usage(where).free
    if 2 * output <= 0.9 * free:
        return None
    return f"streaming the splits keeps two pruned outputs ({2 * output / 1e9:.1f} GB) on disk at once, more than 90% of the free {free / 1e9:.1f} GB in {where}"


def _fit_preset_sample(spec, calibrate, args, show: bool):
    """``calibrate`` with the preset's compensation sample halved, not below the CLI's default, until an in-memory
    prune's sampled statistics fit the host's available memory: the preset's data budget is a default, so a machine
    too small for it gets the largest sample that fits instead of a refusal (below the default, the refusal stands)."""
    from moe_fx.calibrate import check_host_memory
    from moe_fx.errors import HostMemoryError

    floor, n = args.parser_defaults["compensate_samples"], calibrate.inputs_per_block
    while n > floor:
        try:
            check_host_memory(spec, dataclasses_replace(calibrate, inputs_per_block=n).make_observers())
            break
        except HostMemoryError:
            n = max(floor, n // 2)
    if n != calibrate.inputs_per_block and show:
        print(f"moe-fx: --preset {args.preset} fitted to this machine: --compensate-samples {n} "
              f"({calibrate.inputs_per_block:,} tokens a layer would not fit the CPU memory available)")
    args.compensate_samples = n
    return dataclasses_replace(calibrate, inputs_per_block=n)


def _model_limits(meta) -> dict:
    """What a preset needs to know of the model (:func:`moe_fx.run.presets.fit_to_model`), from its structure alone."""
    from moe_fx.errors import UnsupportedFamilyError
    from moe_fx.passes import CompensateExperts
    from moe_fx.pipeline import state_of
    from moe_fx.plan.allocate import shared_layers
    from moe_fx.score import get_scorer

    spec = state_of(meta).spec

    def refusal(check) -> str | None:
        try:
            check()
        except UnsupportedFamilyError as e:
            return str(e)
        return None

    return {"language_model": meta.can_generate(), "compensation_refused": refusal(lambda: CompensateExperts().check_model(meta, spec)),
            "shared_layers": shared_layers(spec), "channels_refused": refusal(lambda: get_scorer("obs").check(spec))}


def _check_distill_memory(meta, spec, args, device: str, stream: bool, show: bool) -> None:
    """Print what distillation will hold (weights, gradients, AdamW moments, the teacher) and refuse, before loading
    anything, a run whose total already exceeds the device's memory (the host's available memory on the CPU).
    ``--distill-train`` left unset trains the experts; with ``--preset`` it trains adapters instead where only they fit
    (the preset's recovery, in the memory there is, rather than a refusal), and says so."""
    from moe_fx.calibrate import host_memory_available
    from moe_fx.rewrite.distill import LEARNING_RATES, training_memory

    kept = args.keep / spec.blocks[0].num_experts if args.keep is not None else 1 - args.ratio
    if args.granularity == "channel" and args.expert_ratio:
        kept *= 1 - args.expert_ratio
    capacity = torch.cuda.mem_get_info(torch.device(device))[1] if device.startswith("cuda") else host_memory_available()
    gb = lambda n: f"{n / 1e9:.1f} GB"

    def plan_for(train: str) -> dict[str, int]:
        return training_memory(meta, spec, kept_fraction=kept, train=train, rank=args.distill_rank,
                               teacher_in_memory=args.distill_teacher == "model" and not stream)

    total = lambda train: sum(plan_for(train).values())
    if args.distill_train is None:
        args.distill_train = "experts"
        experts, adapters = (total(t) for t in ("experts", "adapters")) if args.preset and capacity is not None else (0, 0)
        if experts > capacity >= adapters > 0:
            args.distill_train = "adapters"
            if show:
                print(f"moe-fx: --preset {args.preset} fitted to this machine: --distill-train adapters "
                      f"(training the experts would hold {gb(experts)} before activations, more than {device}'s {gb(capacity)}; "
                      f"rank-{args.distill_rank} adapters {gb(adapters)})")
    if args.preset and args.distill_train == "adapters":  # a preset's rate is the experts' (--distill-lr beside it is refused)
        args.distill_lr = LEARNING_RATES["adapters"]
        if show:
            print(f"moe-fx: --preset {args.preset}: --distill-lr {args.distill_lr:g} with --distill-train adapters (the adapters' rate)")
    plan = plan_for(args.distill_train)
    need = sum(plan.values())
    parts = " + ".join(f"{k} {gb(v)}" for k, v in plan.items() if v)
    if capacity is not None and need > capacity:
        smaller = {"experts": ("adapters", "routers"), "all": ("adapters", "routers"), "adapters": ("routers",)}.get(args.distill_train, ())
        cheaper = "".join(f"; --distill-train {train} needs {gb(total(train))}" for train in smaller)
        raise MoeFxError(f"distillation would hold {gb(need)} ({parts}) before activations, more than {device}'s {gb(capacity)}: "
                         f"use a larger device{cheaper}, or --distill-teacher cached if the teacher is in memory")
    if show:
        print(f"moe-fx: distillation will hold {gb(need)} on {device} before activations ({parts})")


def _streamed_then_distilled(source: Path, passes: list, args, device: str, tokenizer, show: bool):
    """``--stream on --distill-steps N --distill-teacher cached``: the streamed prune (which also caches the unpruned
    model's top-k on the calibration windows) into a staging directory beside the output, then the pruned student
    loaded whole and distilled on the cache: memory is the student and its trainable state, never the teacher.
    Returns the student, its state and the streamed run's record entry ``streaming`` (per-layer times, peak memory); the
    staging directory and the cache are removed, also after a failure."""
    import shutil

    from moe_fx.formats.loading import load_model
    from moe_fx.pipeline import STATE_ATTR, compose
    from moe_fx.rewrite.distill import Distill
    from moe_fx.run.streaming import stream_prune

    out = Path(args.out)
    staging, cache_dir = out.with_name(f".{out.name}.streamed"), out.with_name(f".{out.name}.teacher")
    distill = next(p for p in passes if isinstance(p, Distill))
    streamed_passes = [p for p in passes if p is not distill]
    try:
        for leftover in (staging, cache_dir):
            shutil.rmtree(leftover, ignore_errors=True)
        streamed = stream_prune(source, staging, streamed_passes, device=device, dtype=args.dtype, tokenizer=tokenizer, overwrite=True,
                                show_progress=show, report=False, teacher_cache=cache_dir, teacher_top_k=args.distill_top_k)
        streamed_record = {k: v for k, v in json.loads((staging / "moe_fx.json").read_text()).items() if k == "streaming"}
        model = load_model(staging, dtype=args.dtype, device=device, quantize=None, ragged=False)
        object.__setattr__(model, STATE_ATTR, streamed.state)  # the streamed run's plan, statistics and history
        model = compose(dataclasses_replace(distill, teacher=cache_dir))(model)
        return model, streamed.state, streamed_record
    finally:
        for leftover in (staging, cache_dir):
            shutil.rmtree(leftover, ignore_errors=True)


def _streaming(args, source, device: str) -> bool:
    """Whether this prune streams: ``--stream on``, or ``auto`` when the weights would not fit the device."""
    from moe_fx.calibrate import distributed
    from moe_fx.evaluate.nll import disk_size

    if args.stream == "off":
        return False
    if args.stream == "auto":
        if device.startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        weights = disk_size(source)
        if not distributed.broadcast_object(weights > 0.8 * free):  # every rank takes rank 0's decision
            return False
        if distributed.is_main():
            print(f"moe-fx: the weights of {source} ({weights / 2**30:.1f} GiB) exceed 80% of the free memory of {device}: streaming layer by layer (--stream off to force in memory)")
    return True


def _check_granularity(args, scorer, expert_scorer) -> None:
    """Options that only make sense for one granularity, and scorers of the other one, are named errors."""
    channels = args.granularity == "channel"
    allowed = ("uniform", "layer", "expert", "buckets", "buckets-per-layer", "coverage") if channels else ("uniform", "global")
    if args.allocation not in allowed:
        raise MoeFxError(f"--allocation {args.allocation} is for {'experts' if channels else 'channels'}; with --granularity {args.granularity} use one of {', '.join(allowed)}")
    if scorer.granularity != args.granularity:
        raise MoeFxError(f"--method {args.method} scores {scorer.granularity}s; pass --granularity {scorer.granularity} or a {args.granularity} method")
    if channels and (args.merge or args.method == "eep" or args.keep is not None):
        raise MoeFxError("--granularity channel takes --ratio (fraction of channels), without --merge, --keep or --method eep")
    if channels and not 0 < args.ratio < 1:
        raise MoeFxError(f"--ratio {args.ratio}: ratio must be in (0, 1), the fraction of the routed experts' channels to remove")
    if not channels and args.expert_ratio is not None:
        raise MoeFxError("--expert-ratio is for --granularity channel (drop experts, then channels); for experts alone use --ratio")
    if expert_scorer is not None and expert_scorer.granularity != "expert":
        raise MoeFxError(f"--expert-method {args.expert_method} does not score experts; use reap, frequency, ...")


def _width_align(args, spec, channels: bool) -> int:
    """The step of the pruned channel widths (:func:`~moe_fx.plan.plans.width_step`): fp8-block's 128 x 128 blocks, which
    transformers' FP8 loader and GPU kernels need whole, when channels are pruned and the output is FP8; else
    :data:`~moe_fx.plan.plans.WIDTH_ALIGN`. Chosen before any work, so the written widths always take the scheme."""
    if not (channels and args.quantize == "fp8-block"):
        return WIDTH_ALIGN
    if any(b.experts.intermediate_size > FP8_BLOCK for b in spec.blocks) and not args.quiet:
        print(f"moe-fx: --quantize fp8-block: pruned expert widths are multiples of {FP8_BLOCK} (whole FP8 blocks, which "
              "transformers' FP8 loader and kernels need)")
    return FP8_BLOCK


def _output_format(args, source: Path) -> None:
    """Resolve ``--quantize`` and its options in ``args``: as given, else a quantized source's own format (scheme,
    group size, targets; :func:`~moe_fx.formats.stored_format.stored_format`), so a pruned FP8 or int4 checkpoint
    stays one, as MXFP4 ones do; ``none`` writes dense. ``args.quantize_kept`` says whether the source's was taken."""
    if args.quantize_group_size is not None and args.quantize != "int4-group":
        raise BadOptionError("--quantize-group-size sets the scale groups of --quantize int4-group; add it, or drop --quantize-group-size")
    kept = stored_format(source)
    args.quantize_kept = args.quantize is None and kept is not None
    if args.quantize_kept:
        args.quantize, args.quantize_group_size = kept.scheme, kept.group_size
        args.quantize_targets = args.quantize_targets or kept.targets
        if not args.quiet:
            print(f"moe-fx: {source} is stored in {kept.scheme} ({kept.targets}); the pruned checkpoint keeps that format "
                  "(--quantize none writes it dense)")
    if args.quantize == "none":
        args.quantize = None
    if args.quantize_targets is not None and not args.quantize:
        raise BadOptionError(f"--quantize-targets {args.quantize_targets} says what --quantize covers; add --quantize SCHEME")
    args.quantize_targets = args.quantize_targets or "experts"
    args.quantize_group_size = args.quantize_group_size or DEFAULT_GROUP


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.calibrate import OBSERVERS, check_host_memory, distributed
    from moe_fx.calibrate.data import TokenBatch, pack, split_fitness
    from moe_fx.evaluate.nll import checkpoint_size, disk_size, evaluate_nll, model_size
    from moe_fx.evaluate.report import write_report
    from moe_fx.evaluate.table import format_table, human_bytes
    from moe_fx.evaluate.zero_shot import resolve_tasks
    from moe_fx.formats.checkpoint import check_output_path, read_record, save_checkpoint, source_mxfp4, update_record
    from moe_fx.formats.lazy import meta_model
    from moe_fx.formats.loading import check_model_dir, load_model, load_tokenizer
    from moe_fx.passes import CacheTeacher, Calibrate, ChooseRecipe, CompensateExperts, Distill
    from moe_fx.pipeline import compose, state_of
    from moe_fx.plan.allocate import check_allocation, check_budget, experts_to_keep
    from moe_fx.plan.channel_allocate import uniform_widths
    from moe_fx.plan.eep import EvolutionarySearch
    from moe_fx.rewrite.prune_channels import routed_parameters
    from moe_fx.run.recipe import SUBSTITUTE, bucket_candidates, observers_for, parse_method, prune_passes, split_label, split_passes
    from moe_fx.run.streaming import stream_evaluate, stream_prune
    from moe_fx.score import get_scorer

    source = check_model_dir(args.model)
    check_output_path(args.out, source, args.overwrite)
    if args.tasks:
        resolve_tasks(args.tasks, task_dir(args))
    device = resolve_device(args.device)
    if distributed.init_from_env(device) and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    stream = _streaming(args, source, device)
    _output_format(args, source)
    if args.quantize and source_mxfp4(source) is not None:
        raise BadOptionError(f"{source}'s experts are MXFP4, which the pruned copy keeps; drop --quantize {args.quantize}")
    # the model's structure without its weights: options the family cannot take are refused before loading
    meta = meta_model(source, args.dtype, device)
    spec = state_of(meta).spec
    routed_source = routed_parameters(meta, spec)  # before any pass: an expert drop ahead of the channels counts too
    if args.preset:
        _apply_preset(args, stream, meta, device)
    elif args.expert_shares is not None:
        raise MoeFxError("--expert-shares chooses the split of --preset best-oneshot-params; add --preset best-oneshot-params, or give "
                         "--granularity channel --expert-ratio R for a fixed split")
    splits = getattr(args, "split_candidates", None)  # in memory, --preset best-oneshot-params tries several splits
    channels = args.granularity == "channel"
    if args.quantize:
        check_before_pruning(source, args.quantize, group_size=args.quantize_group_size, targets=args.quantize_targets)
    args.align = _width_align(args, spec, channels)
    asked = args.method or (("obs" if stream else "fisher") if channels else "reap")  # Fisher needs the whole model's gradient
    args.method, merge = parse_method(asked)
    args.merge_flag, args.merge = args.merge, merge or ("nearest" if args.merge else None)
    search = args.method == "eep"
    scorer = get_scorer(args.eep_warm_start if search else args.method, seed=args.seed)
    expert_scorer = get_scorer(args.expert_method, seed=args.seed) if channels and (args.expert_ratio or splits) else None
    _check_granularity(args, scorer, expert_scorer)
    if args.compiled_calibration:
        from moe_fx.deliver.graph import GRAPH_OBSERVERS

        needed = observers_for([s for s in (scorer, expert_scorer) if s], merge=args.merge, compensate=args.compensate)
        eager_only = [o for o in needed if o not in GRAPH_OBSERVERS]
        if eager_only:
            raise MoeFxError(f"--compiled-calibration records {', '.join(GRAPH_OBSERVERS)} statistics only; this run needs "
                             f"{', '.join(eager_only)} (sampled or gradient statistics): drop --compiled-calibration")
    needs_data = scorer.needs or (expert_scorer and expert_scorer.needs)
    needs_windows = needs_data or search or splits or args.merge or args.compensate or args.distill_steps
    if needs_windows and not args.calib:
        raise MoeFxError(f"--method {asked}{' --merge' if args.merge_flag else ''}{' --compensate' if args.compensate else ''}"
                         f"{' --distill-steps' if args.distill_steps else ''} needs calibration data: pass --calib FILE")
    if args.distill_steps < 0 or (args.distill_lr is not None and not args.distill_lr > 0) or args.distill_top_k < 1 or args.distill_rank < 1 or (
            args.distill_batch_size is not None and args.distill_batch_size < 1):
        raise MoeFxError(f"--distill-steps must be >= 0, --distill-lr > 0, --distill-top-k, --distill-rank and --distill-batch-size >= 1, got "
                         f"{args.distill_steps}, {args.distill_lr}, {args.distill_top_k}, {args.distill_rank} and {args.distill_batch_size}")
    if args.calib_tokens < 1 or args.seq_len < 2:
        raise MoeFxError("--calib-tokens must be positive and --seq-len at least 2")
    if args.merge == SUBSTITUTE and (args.distill_steps or args.quantize or args.merge_flag):
        drop = "--distill-steps" if args.distill_steps else "--merge" if args.merge_flag else (
            "--quantize (the source is quantized: --quantize none writes it dense)" if args.quantize_kept else "--quantize")
        raise MoeFxError(f"--method mone writes the final model (its routers route to constants the experts module does not hold): drop {drop}")
    if stream and search:
        raise MoeFxError("--method eep searches over the whole model at once; it cannot stream layer by layer (use --stream off on a device that holds the model)")
    if stream and args.distill_steps and args.distill_teacher != "cached":
        raise MoeFxError("--distill-steps with the model as teacher holds the source beside the student, which a streamed prune never does; "
                         "use --distill-teacher cached (the teacher's top-k are cached by the streamed pass) or --stream off")
    if stream and args.distill_steps and args.nproc > 1:
        raise MoeFxError("--stream on --distill-steps caches the teacher in a single process; drop --nproc")
    if args.sequential and not stream:
        raise MoeFxError("--sequential runs each pruned layer again while streaming layer by layer: add --stream on")
    if args.sequential and args.distill_steps:
        raise MoeFxError("--sequential carries the pruned model's hidden states, while --distill-steps streamed caches the unpruned "
                         "model's outputs from the same pass: drop --sequential")
    if args.sequential and args.nproc > 1:
        raise MoeFxError("--sequential re-runs each layer after rank 0 rewrites it: drop --nproc")
    if stream and args.compiled_calibration:
        raise MoeFxError("--compiled-calibration compiles the whole model, which a streamed prune never holds; use --stream off")
    if stream and (args.tasks or args.generate):
        raise MoeFxError(f"{'--eval-tasks' if args.tasks else '--eval-generate'} needs the whole model in memory, which a streamed prune never "
                         "holds; run `moe-fx eval SOURCE OUT ...` on a device that holds it, or use --stream off")
    if args.generate and args.no_eval:
        raise MoeFxError("--eval-generate continues held-out prompts: drop --no-eval")
    for expert_ratio in [er for er, _ in splits] if splits else [args.expert_ratio] if channels else [None]:
        if not channels or expert_ratio:
            check_budget(spec, ratio=expert_ratio if channels else args.ratio, keep=None if channels else args.keep)
    if not channels and args.allocation in ("uniform", "global"):
        check_allocation(spec, args.allocation)
    if not channels and args.ratio is not None and all(experts_to_keep(b.num_experts, args.ratio, None) == b.num_experts for b in spec.blocks):
        fewest = min(b.num_experts for b in spec.blocks)
        raise MoeFxError(f"--ratio {args.ratio:g} drops no expert (of {fewest} a block, rounded): nothing would be pruned; give a ratio of "
                         f"at least {1 / fewest:.3g} (one expert)")
    if channels and args.allocation == "uniform" and not splits:
        uniform_widths(spec, args.ratio, args.align)  # refuses a ratio the widths' rounding turns into no change
    tokenizer = load_tokenizer(source)
    calib_docs, eval_set = calibration_and_eval(args, tokenizer)
    gradients = any(OBSERVERS[o].needs_grads for o in observers_for([s for s in (scorer, expert_scorer) if s]))
    check_language_model(meta, source, {"NLL evaluation (pass --no-eval)": eval_set is not None, "--method eep (its fitness is the NLL)": search,
                                        f"--method {args.method} (gradients of the NLL)": gradients,
                                        "--eval-generate": bool(args.generate), "--eval-tasks": bool(args.tasks)})
    check_token_ids(meta, source, *(eval_set.windows.values() if eval_set else ()))
    show = not args.quiet and distributed.is_main()

    passes = []
    allocation = args.allocation
    if needs_windows:
        windows = pack(tokenizer, calib_docs, seq_len=args.seq_len, max_tokens=args.calib_tokens + (args.fitness_tokens if search or splits else 0),
                       seed=args.seed)
        check_token_ids(meta, source, windows)
        if search or splits:
            windows, fitness = split_fitness(windows, args.fitness_tokens)
        if search:
            allocation = EvolutionarySearch(
                fitness, population=args.eep_population, generations=args.eep_generations, max_seconds=args.eep_max_seconds,
                allocation=args.allocation, batch_size=args.batch_size, seed=args.seed, show_progress=show,
                refine=CompensateExperts(ridge=args.ridge) if args.compensate and not args.merge else None,
            )
        scorers = [scorer] + ([expert_scorer] if expert_scorer else [])
        passes.append(Calibrate(TokenBatch(windows, args.calib), batch_size=args.batch_size, seed=args.seed,
                                observers=observers_for(scorers, merge=args.merge, compensate=args.compensate),
                                samples_per_block=args.search_samples, inputs_per_block=args.compensate_samples, show_progress=show, compiled=args.compiled_calibration))
    if channels:
        rewrite = functools.partial(split_passes, expert_scorer, scorer, spec, compensate=args.compensate, allocation=allocation,
                                    multiple=args.multiple, align=args.align, seed=args.seed, ridge=args.ridge)
        if splits:
            candidates = {split_label(s): tuple(rewrite(expert_ratio=s[0], channel_ratio=s[1])) for s in splits}
            for label, bucketed in (bucket_candidates(args.params_ratio, stream) if getattr(args, "bucket_candidate", False) else {}).items():
                candidates[label] = tuple(rewrite(expert_ratio=0.0, channel_ratio=args.params_ratio, allocation=bucketed))
            passes.append(ChooseRecipe(candidates, data=fitness, batch_size=args.batch_size, show_progress=show))
        else:
            passes += rewrite(expert_ratio=args.expert_ratio, channel_ratio=args.ratio)
    else:
        passes += prune_passes(scorer, spec, ratio=args.ratio, keep=args.keep, merge=args.merge, compensate=args.compensate,
                               allocation=allocation, multiple=args.multiple, seed=args.seed, ridge=args.ridge)
    if args.distill_steps:
        _check_distill_memory(meta, spec, args, device, stream, show)
        data = TokenBatch(windows, args.calib)
        cached = args.distill_teacher == "cached"
        if cached and not stream:  # before the first pass that changes the model (a streamed prune caches in its own pass)
            passes.insert(1, CacheTeacher(data, top_k=args.distill_top_k, batch_size=args.batch_size, seed=args.seed, show_progress=show))
        passes.append(Distill(teacher="cached" if cached else source, data=data, steps=args.distill_steps, lr=args.distill_lr,
                              train=args.distill_train, rank=args.distill_rank, batch_size=args.distill_batch_size or args.batch_size,
                              micro_batch_size=args.batch_size, seed=args.seed, show_progress=show))
    compose(*passes).check_model(meta)
    if needs_windows and not stream:  # a streamed run checks its one block's sample itself
        at = next(i for i, p in enumerate(passes) if isinstance(p, Calibrate))
        if "compensate_samples" in getattr(args, "preset_took", ()):
            passes[at] = _fit_preset_sample(spec, passes[at], args, show)
        check_host_memory(spec, passes[at].make_observers())

    model = meta if stream else load_model(source, dtype=args.dtype, device=device, quantize=None, ragged=False)
    save_dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else next(model.parameters()).dtype
    size_of = checkpoint_size if stream else model_size
    evaluate = functools.partial(stream_evaluate, device=device, dtype=args.dtype) if stream else evaluate_nll
    before_size = size_of(source if stream else model)
    before = evaluate(source if stream else model, eval_set, batch_size=args.batch_size, show_progress=show) if eval_set else None
    tasks_before = zero_shot_results(model, tokenizer, args, device, checkpoint=source) if args.tasks and distributed.is_main() else None
    gen_ref = None
    if args.generate and eval_set and distributed.is_main():  # the unpruned model's continuations, before the passes change it
        from moe_fx.evaluate.generation import generation_prompts, reference

        prompts = generation_prompts(eval_set, prompts=args.generate, prompt_len=args.prompt_len)
        gen_ref = reference(model, prompts, args.generate_tokens, batch_size=args.batch_size, show_progress=show)

    t0 = time.perf_counter()
    streamed_record: dict = {}
    if stream and args.distill_steps:  # stream the prune and the teacher pass, then train the student alone, in memory
        model, state, streamed_record = _streamed_then_distilled(source, passes, args, device, tokenizer, show)
        stream, size_of, evaluate = False, model_size, evaluate_nll  # from here on the student is in memory
    elif stream:
        streamed = stream_prune(source, args.out, passes, device=device, dtype=args.dtype, tokenizer=tokenizer,
                                overwrite=args.overwrite, show_progress=show, report=False, sequential=bool(args.sequential),
                                expert_storage="padded" if args.quantize else args.expert_storage)  # written once, with the evaluations
        if streamed is None:  # another rank: rank 0 writes, evaluates and reports
            return 0
        out, state = streamed.out, streamed.state
    else:
        model = compose(*passes)(model)
        state = state_of(model)
    prune_seconds = time.perf_counter() - t0
    choice = state.report_of("choose_recipe")
    bucketed = bucket_candidates(args.params_ratio, stream) if getattr(args, "params_ratio", None) else {}
    if choice and choice["chosen"] in bucketed:  # the record and the summary name the split that was kept
        args.expert_ratio, args.ratio = args.params_split = (0.0, args.params_ratio)
        args.allocation = bucketed[choice["chosen"]]
    elif choice:
        args.expert_ratio, args.ratio = args.params_split = next(s for s in splits if split_label(s) == choice["chosen"])
    after = evaluate(out if stream else model, eval_set, batch_size=args.batch_size, show_progress=show) if eval_set else None
    after_size = size_of(out if stream else model)
    tasks_after = zero_shot_results(model, tokenizer, args, device) if args.tasks and distributed.is_main() else None
    if gen_ref is not None:
        from moe_fx.evaluate.generation import agreement

        generation = agreement(model, gen_ref, batch_size=args.batch_size, show_progress=show)
    else:
        generation = None

    if not distributed.is_main():
        return 0
    record = {
        "cli": {k: v for k, v in vars(args).items() if k not in ("func", "parser_defaults")},
        "eval_before": before,
        "eval_after": after,
        "eval_source": args.eval_data or (f"held-out {args.holdout:.0%} of {args.calib}" if eval_set else None),
        "tasks_before": tasks_before,
        "tasks_after": tasks_after,
        "generation": generation,
        "size_before": before_size,
        "size_after": after_size,
        "prune_seconds": prune_seconds,
        "world_size": distributed.world_size(),
        **streamed_record,
    }
    if stream:
        update_record(out, record)
        if args.quantize:  # the streamed output is rewritten shard by shard, replaced only when complete
            quantize_in_place(out, scheme=args.quantize, group_size=args.quantize_group_size, show_progress=show, targets=args.quantize_targets,
                              fit_group=True)
    else:
        model.to(save_dtype)
        record["size_after"] = model_size(model)
        out = save_checkpoint(model, args.out, source=source, tokenizer=tokenizer, overwrite=args.overwrite, extra_record=record,
                              quantize=args.quantize, quantize_targets=args.quantize_targets, quantize_group_size=args.quantize_group_size,
                              expert_storage=args.expert_storage, report=False)
    written = read_record(out)  # the sizes, the experts' storage and format as written, not as held in memory
    if not stream:
        after_size = written["size_after"]
    rounded = (written.get("expert_format") or {}).get("max_relative_error", 0) > 0  # MXFP4 experts a pass changed
    as_saved, stored_as = None, args.quantize or ("mxfp4" if rounded else None)
    if stored_as and eval_set:  # the NLL above is the pruned model's in memory; users get it quantized: read it back
        as_saved = stream_evaluate(out, eval_set, device=device, dtype=args.dtype, batch_size=args.batch_size, show_progress=show)
        update_record(out, {"eval_saved": as_saved})
    write_report(out)

    kept = sum(b.num_experts for b in state.spec.blocks)
    total = sum(b.num_experts for b in spec.blocks)
    per_block = sorted({b.num_experts for b in state.spec.blocks})
    channel_report = state.report_of("prune_channels")
    disk_before, disk_after = disk_size(source), disk_size(out)
    rows = [
        ["experts per block", spec.blocks[0].num_experts, str(per_block[0]) if len(per_block) == 1 else f"{per_block[0]}-{per_block[-1]}", ""],
        ["experts (all blocks)", total, kept, f"{kept / total - 1:+.1%}"],
        ["expert width", spec.blocks[0].experts.intermediate_size, span(b.experts.intermediate_size for b in state.spec.blocks), ""],
        ["parameters", f"{before_size['params']:,}", f"{after_size['params']:,}", f"{after_size['params'] / before_size['params'] - 1:+.1%}"],
        ["weights on disk", human_bytes(disk_before), human_bytes(disk_after), f"{disk_after / disk_before - 1:+.1%}"],
    ]
    if before and after:
        for d in [k for k in before if k not in ("mean", "all")] + ["mean"]:
            rows.append([f"NLL {d}", f"{before[d]['nll']:.4f}", f"{after[d]['nll']:.4f}", f"{after[d]['nll'] - before[d]['nll']:+.4f}"])
    if before and as_saved:
        rows.append([f"NLL mean as saved ({stored_as})", f"{before['mean']['nll']:.4f}", f"{as_saved['mean']['nll']:.4f}",
                     f"{as_saved['mean']['nll'] - before['mean']['nll']:+.4f}"])
    calib = state.stats.summary() if state.stats is not None else None
    budget = (f"ratio={args.params_ratio:g} of the routed parameters ({split_label(args.params_split)})"
              if getattr(args, "params_ratio", None) else f"ratio={args.ratio:g}" if args.ratio is not None else f"keep {args.keep}")
    title = f"moe-fx prune {'--preset ' + args.preset if args.preset else args.method} {budget} -> {out}"
    print(format_table(["", "before", "after", "change"], rows, title=title))
    if channel_report:
        r = channel_report
        print(f"routed-expert parameters: {routed_source:,} -> {r['routed_params_after']:,} stored "
              f"({r['routed_params_after'] / routed_source - 1:+.1%}); kept channels alone: {r['routed_params_ideal']:,} "
              f"({r['routed_params_ideal'] / routed_source - 1:+.1%}); zero padding {r['routed_params_after'] - r['routed_params_ideal']:,}")
    buckets = written.get("expert_storage")
    if buckets:
        print(f"stored in width buckets: {buckets['routed_params_stored']:,} routed-expert parameters "
              f"({buckets['routed_params_stored'] / routed_source - 1:+.1%}), at most {max(map(len, buckets['buckets'].values()))} "
              "widths per layer; load with moe_fx.load or from_pretrained(..., trust_remote_code=True)")
    substituted = state.report_of("substitute_experts", modified_only=True)
    if substituted:
        how = [f"{substituted['novice_blocks']} layers hold them beside their kept experts (load with moe_fx.load or "
               "from_pretrained(..., trust_remote_code=True))" if substituted["novice_blocks"] else "",
               f"{substituted['folded_blocks']} layers as zero-weight experts with the constant as down bias (the stock format)"
               if substituted["folded_blocks"] else ""]
        print(f"substituted by constants (MoNE): {substituted['substituted']} experts, routers kept whole; " + "; ".join(h for h in how if h))
        if substituted["refit"]:
            errors = [(r["error_before"], r["error_after"]) for r in substituted["refit"].values()]
            print(f"refit of the kept experts and the constants: block output error on the calibration sample "
                  f"{sum(b for b, _ in errors) / len(errors):.4f} -> {sum(a for _, a in errors) / len(errors):.4f} (relative, mean over blocks)")
    compensated = state.report_of("compensate_experts")
    if compensated and compensated["mean_error_before"] is not None:  # None: no block had sampled tokens
        print(f"compensation: block output error on the calibration sample {compensated['mean_error_before']:.4f} -> "
              f"{compensated['mean_error_after']:.4f} (relative, mean over blocks)")
    distilled = state.report_of("distill", modified_only=True)
    if distilled:
        print(f"distillation: KL to the unpruned model {distilled['kl_first']:.4f} -> {distilled['kl_last']:.4f} over {distilled['steps']} steps "
              f"({distilled['trained_params']:,} parameters trained; teacher: {distilled['teacher']})")
    quantization = written.get("quantization") or {}
    if note := partial_blocks_note(quantization):
        print(note)
    if after and as_saved:
        measured = ["the NLL rows above"] + ["the zero-shot accuracies"] * bool(tasks_after) + ["the greedy agreement"] * bool(generation)
        print(f"quantization ({stored_as}) adds {as_saved['mean']['nll'] - after['mean']['nll']:+.4f} to the pruned model's mean NLL: "
              f"the last row is the saved checkpoint read back from disk; {', '.join(measured[:-1]) + ' and ' * (len(measured) > 1) + measured[-1]} "
              "are the pruned model before quantization")
    if quantization.get("group_size_asked"):
        print(f"experts written in int4-group with groups of {quantization['group_size']}: the pruned widths are not all multiples of "
              f"{quantization['group_size_asked']} (a group must tile each expert's inputs)")
    expert_format = written.get("expert_format")
    if expert_format:
        changed = expert_format["max_relative_error"]
        print(f"experts written in {expert_format['format'].upper()} like the source ({human_bytes(expert_format['bytes'])} of weights)"
              + (f"; weights a pass changed were rounded to it (largest relative error {changed:.3f})"
                 + ("" if as_saved else f": `moe-fx eval {out}` measures the saved model") if changed > 0 else "; the kept experts' values are exact"))
    if choice:
        print(f"split kept: {choice['chosen']}, NLL {choice['fitness'][choice['chosen']]:.4f} on {choice['fitness_tokens']:,} held-out calibration "
              "tokens (" + "; ".join(f"{label}: {v:.4f}" for label, v in choice["fitness"].items()) + ")")
    if state.search is not None:
        r = state.search
        print(f"eep search: fitness NLL {r.start_fitness:.4f} (warm start) -> {r.fitness:.4f} after {r.evaluations} plans in {r.seconds:.1f} s")
    if calib:
        print(f"calibration: {calib['tokens']:,} tokens in {calib['seconds']:.1f} s ({calib['tokens'] / max(calib['seconds'], 1e-9):,.0f} tok/s), fingerprint {calib['fingerprint']}")
    if eval_set:
        print(f"evaluation: {record['eval_source']}, {eval_set.scored_tokens:,} tokens scored")
    if args.tasks:
        limit = f", first {args.limit} items per task" if args.limit else ""
        print(format_table(*task_rows([tasks_before, tasks_after], ["before", "after"]), title=f"zero-shot accuracy (%){limit}"))
    if generation:
        print(format_table(*generation_rows([generation], ["pruned"]), title=f"greedy continuations against the unpruned model: {args.generate} "
                           f"prompts of {args.prompt_len} tokens, {args.generate_tokens} new tokens"))
    if stream:
        s = streamed
        gpu = f"peak GPU memory {human_bytes(s.peak_gpu_bytes)}, " if s.peak_gpu_bytes is not None else ""
        print(f"streamed {s.layers} layers ({s.resumed_layers} resumed) in {s.seconds:.1f} s: {gpu}peak CPU memory {human_bytes(s.peak_cpu_bytes)}; "
              f"largest layer {human_bytes(s.layer_weight_bytes)}, hidden states {human_bytes(s.hidden_state_bytes)}")
    return 0
