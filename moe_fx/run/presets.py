"""Named pruning recipes, so a user does not have to know the best combination of options: ``moe-fx prune
--preset NAME`` (and :func:`preset_options` for scripts) expands to the options the measurements chose.

What chose them (``docs/benchmarks/quality.md``; trained qwen3moe-bench, held-out valid split, Δ NLL against
REAP's on the same calibration tokens):

- ``best-oneshot``: EEP (global allocation) + compensation, the best pipeline without training at both budgets
  measured: 0.73x REAP's loss at 25% of the experts dropped and 0.59x at 50% (REAP + compensation: 0.83x and
  0.66x). EEP searches over the whole model, so a streamed prune (a model larger than the device) takes the
  best pipeline that streams, REAP + compensation.
- ``best``: ``best-oneshot`` then 300 distillation steps of 32 windows (lr 1e-3, chosen on held-out train
  windows over 3e-4) on 1M calibration tokens: 0.16x REAP's loss at 25% (REAP + compensation + the same: 0.17x;
  at 50%, 0.14x REAP 50%'s loss and 0.62x REAP 25%'s). Streamed, REAP + compensation, then the same steps
  distilled from the unpruned model's top-64 distributions cached by the streamed pass (the teacher is never in
  memory): 0.20x. The distinct tokens matter: the same steps on 200k tokens reached 0.30x (the KL on the
  training windows fell to 0.027 against 0.057: it learns the windows), so 1M tokens is the preset's
  calibration budget unless ``--calib-tokens`` says otherwise.

Both compensate on 65,536 sampled tokens a layer unless ``--compensate-samples`` is given (4x the CLI's default and
its memory; 0.75x instead of 0.81x REAP's loss at 25% for REAP + compensation). The figures above were measured
with 16,384; the presets' pipelines were not re-measured with 65,536.

Both are expert-pruning recipes: the budget is ``--ratio`` / ``--keep`` of the experts.

- ``best-oneshot-params``: the budget is ``--ratio`` of the routed experts' *parameters*, removed as whole experts
  (REAP) and/or channels of the kept experts (``obs``, which needs no gradient), then compensation on 65,536 tokens a
  layer. In memory two more candidates spend it all on channels with per-expert widths stored in width buckets
  (:mod:`moe_fx.formats.ragged`; the output then loads through ``moe_fx.load`` or ``trust_remote_code``), ranked
  across the model (``--allocation buckets``) or each layer removing its own share (``buckets-per-layer``): on
  qwen3moe-bench the first was kept at 25% and the second at 50%, 0.44x / 0.35x REAP's loss
  (``preset_vs_reap_bench_five_cpu.json``; not tried with ``--expert-storage padded`` or ``--quantize``, where they
  would not store their budget). Streamed, only the per-layer one can be planned: 0.46x at 25% and 0.35x at 50%,
  kept at both (``preset_vs_reap_bench_streamed_buckets_cpu.json``). The other candidates keep one width for every expert, a stock checkpoint. Which split is best depends on the model
  (``preset_vs_reap_*.json``: at 25%, all of it as experts on a Mixtral, 0.79x REAP's loss against 1.25x as channels;
  channels on qwen3moe-bench and a Qwen2-MoE), so it tries three (``experts_shares``: all as channels, about
  half as experts, all as experts; those the widths' rounding lands within 2 points of the budget,
  :data:`SPLIT_TOLERANCE`) and keeps the one whose pruned model has the lowest NLL on 16,384 held-out calibration
  tokens (:class:`~moe_fx.plan.choose.ChooseRecipe`). On qwen3moe-bench (200k calibration tokens,
  ``preset_vs_reap_bench_cpu.json``) it kept channels alone: 0.59x REAP's loss at 25% and 0.42x at 50%, exactly on
  budget (the fixed half split before: 0.64x removing 26.2%, 0.42x removing 50.6%); on micro Mixtral, Qwen2-MoE,
  OLMoE and DeepSeek-V3 models trained here it kept the split that was best on the valid split wherever it had a choice
  (25% / 50%: 0.79x / 0.15x, 0.30x / 0.17x, 0.26x / 0.20x, 0.12x / 0.21x; ``preset_vs_reap_*_micro_cpu.json``), and on
  bench-scale Mixtral and DeepSeek-V3 models 0.85x / 0.37x and 0.50x (23.4% removed) / 0.48x
  (``preset_vs_reap_*_bench_gpu.json``). It costs
  three rewrites and three forwards over the held-out tokens (242 s against 52 s for REAP on 2 CPU cores for the
  bench model at 25%). Streamed (the whole model is never in memory to measure), each split is streamed whole to its
  own output and that output is measured (:mod:`moe_fx.run.stream_choose`), with ``--sequential`` (each layer
  calibrated on the pruned layers' outputs, for one more forward of each layer; ``--no-sequential`` turns it off): the
  same choices among the one-width splits on qwen3moe-bench, 0.57x at 25% and 0.42x at 50%
  (``preset_vs_reap_bench_streamed_cpu.json``), before the candidate with buckets streamed. The split
  is fixed at about half (``experts_share``) where the choice cannot run: two pruned outputs beyond 90% of the free disk
  (streamed), a pruned copy of the experts beyond 90% of the free memory (in memory), or ``--nproc``. Half is the fixed
  split no measured model punished much (worst 0.90x, the Mixtral at 25%, where all as channels lost 1.25x)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_fx.errors import BadOptionError
from moe_fx.plan.plans import WIDTH_ALIGN


@dataclass(frozen=True)
class Preset:
    """A preset's options in memory and the variant a streamed prune runs; ``measured`` / ``streamed_measured``:
    what chose them, printed when it runs."""

    options: dict
    streamed: dict
    measured: str
    streamed_measured: str
    defaults: dict = field(default_factory=dict)
    """Data budgets the measurement used, taken where the user did not give the option (:data:`PRESET_DEFAULTS`)."""
    experts_share: float | None = None
    """``--ratio`` counts routed-expert parameters: this share of it is removed as whole experts, the rest as
    channels of the kept experts (:func:`split_budget`). None: ``--ratio`` / ``--keep`` count experts."""
    experts_shares: tuple[float, ...] = ()
    """Each of these shares is tried instead and the split whose pruned model has the lowest NLL on held-out calibration
    windows is kept (:class:`~moe_fx.plan.choose.ChooseRecipe`; streamed, each split streamed to its own output);
    ``experts_share`` where the choice cannot run."""


_COMPENSATE = {"compensate_samples": 65536}
"""Compensation fits on 65,536 sampled tokens a layer (REAP + compensation, 400k calibration tokens: 0.75x / 0.60x
REAP's loss at 25% / 50%, against 0.81x / 0.63x on the CLI's default 16,384; ``compensation_samples.json``)."""

_DISTILL = {"distill_steps": 300, "distill_lr": 1e-3, "distill_batch_size": 32}
"""Recovery of ``best``: 32 windows a step (run in parts of ``--batch-size``), lr 1e-3 (better than 3e-4 at this batch)."""

_EXPERTS_THEN_CHANNELS = {"granularity": "channel", "expert_method": "reap", "method": "obs", "allocation": "uniform", "compensate": True}
"""``best-oneshot-params``' pipeline: REAP drops experts, obs scores the kept experts' channels (no gradient), compensation."""

PRESETS: dict[str, Preset] = {
    "best-oneshot": Preset(
        {"method": "eep", "allocation": "global", "compensate": True},
        streamed={"method": "reap", "allocation": "uniform", "compensate": True},
        measured="EEP global + compensation: 0.73x / 0.59x REAP's loss at 25% / 50% on qwen3moe-bench",
        streamed_measured="REAP + compensation: 0.83x / 0.66x REAP's loss at 25% / 50% on qwen3moe-bench",
        defaults=_COMPENSATE,
    ),
    "best": Preset(
        {"method": "eep", "allocation": "global", "compensate": True, **_DISTILL},
        streamed={"method": "reap", "allocation": "uniform", "compensate": True, **_DISTILL, "distill_teacher": "cached"},
        measured="EEP global + compensation + 300 distillation steps of 32 windows: 0.16x REAP's loss at 25% on qwen3moe-bench",
        streamed_measured="REAP + compensation + 300 steps of 32 windows distilled from the cached top-64: 0.20x REAP's loss at 25% "
                          "on qwen3moe-bench",
        defaults={**_COMPENSATE, "calib_tokens": 1_000_000},
    ),
    "best-oneshot-params": Preset(
        _EXPERTS_THEN_CHANNELS,
        streamed={**_EXPERTS_THEN_CHANNELS, "sequential": True},
        measured="the budget as obs channels (one width, or per-expert widths in buckets ranked across the model or per layer), "
                 "about half as REAP experts, or all as experts, + compensation, the split with the lowest held-out NLL kept: 0.44x / "
                 "0.35x REAP's loss at --ratio 0.25 / 0.5 on qwen3moe-bench (widths in buckets kept)",
        streamed_measured="the same but for the buckets ranked across the model (four splits), each streamed to its own output on the pruned "
                          "layers' outputs and measured there, the lowest held-out NLL kept: 0.46x / 0.35x REAP's loss at --ratio 0.25 / 0.5 "
                          "on qwen3moe-bench (widths in buckets kept)",
        defaults=_COMPENSATE,
        experts_share=0.5,
        experts_shares=(0.0, 0.5, 1.0),
    ),
}

PRESET_OPTIONS = ("method", "allocation", "compensate", "merge", "distill_steps", "distill_lr", "distill_batch_size", "granularity",
                  "expert_ratio", "expert_method")
"""The options a preset decides; setting one of them beside ``--preset`` is refused rather than silently overridden."""

PRESET_DEFAULTS = ("calib_tokens", "compensate_samples")
"""Options a preset sets only where the user did not: how much data there is is the user's to say."""


def split_budget(ratio: float, experts_share: float, shape: tuple[int, int, int] | None = None) -> tuple[float, float]:
    """``(expert_ratio, channel_ratio)`` that remove ``ratio`` of the routed-expert parameters: about ``experts_share``
    of it as whole experts, then the fraction of the kept experts' channels that makes up the rest.

    ``shape``: the blocks' ``(experts, width, groups)``. Experts are dropped whole, a multiple of ``groups`` are
    kept (group-limited routing keeps equal groups), and widths are multiples of
    :data:`~moe_fx.plan.plans.WIDTH_ALIGN`, so the exact split rarely exists; of the pairs (experts dropped, width
    kept) whose experts' share of the budget is within half of ``experts_share`` either way (the range the preset's
    measurements covered), the one removing the share nearest ``ratio`` is taken, the larger removal on a tie (the
    budget is met rather than undercut). None: the exact fractions (no rounding). ``experts_share`` 1: the budget as
    experts alone, ``(ratio, 0)``: dropping experts rounds it (:func:`~moe_fx.plan.allocate.experts_to_keep`)."""
    if experts_share >= 1:
        return ratio, 0.0
    target = ratio * experts_share
    if shape is None:
        return target, 1 - (1 - ratio) / (1 - target)
    experts, width, groups = shape
    allowed = [k for k in range(experts) if (experts - k) % groups == 0]
    drops = [k for k in allowed if k and target / 2 <= k / experts <= target * 3 / 2] or [min(allowed, key=lambda k: abs(k / experts - target))]

    def removed(k: int, w: int) -> float:
        return 1 - (experts - k) / experts * w / width

    k, w = min(((k, w) for k in drops for w in range(WIDTH_ALIGN, width, WIDTH_ALIGN)),
               key=lambda kw: (abs(removed(*kw) - ratio), -removed(*kw), abs(kw[0] / experts - target)))
    return k / experts, 1 - w / width


SPLIT_TOLERANCE = 0.02
"""Splits tried side by side remove within this share of the routed parameters of ``--ratio``: the held-out NLL
ranks pruned models fairly only at about the same size (a split removing less would win by keeping more)."""


def removed_share(split: tuple[float, float], shape: tuple[int, int, int]) -> float:
    """Share of a block's routed-expert parameters that ``split`` (``(expert_ratio, channel_ratio)``) removes from
    ``shape`` (``(experts, width, groups)``), with the rounding the rewrites apply (whole experts, widths in steps of
    :data:`~moe_fx.plan.plans.WIDTH_ALIGN`)."""
    from moe_fx.plan.allocate import experts_to_keep
    from moe_fx.plan.channel_allocate import channels_to_keep

    experts, width, _ = shape
    kept = experts_to_keep(experts, split[0], None) if split[0] else experts
    kept_width = channels_to_keep(width, split[1], WIDTH_ALIGN) if split[1] else width
    return 1 - kept / experts * kept_width / width


def near_budget(splits: list[tuple[float, float]], ratio: float, shape: tuple[int, int, int]) -> list[tuple[float, float]]:
    """The splits removing within :data:`SPLIT_TOLERANCE` of ``ratio`` (the one nearest it where none does): on small
    widths or few experts some shares cannot land near the budget at all (widths of 16 channels step by half)."""
    near = [s for s in splits if abs(removed_share(s, shape) - ratio) <= SPLIT_TOLERANCE]
    return near or [min(splits, key=lambda s: abs(removed_share(s, shape) - ratio))]


def feasible_splits(spec, splits: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(expert_ratio, channel_ratio)`` splits whose expert drop every block of ``spec`` can take (at least top-k
    experts kept, whole groups under group-limited routing): a split the model cannot take is not tried rather than
    refusing the run. None feasible: ``splits`` as given, so the first one's refusal names the problem."""
    from moe_fx.plan.allocate import check_budget

    def takes(split: tuple[float, float]) -> bool:
        try:
            if split[0]:
                check_budget(spec, ratio=split[0])
        except BadOptionError:
            return False
        return True

    return [s for s in splits if takes(s)] or splits


def fit_to_model(options: dict, *, language_model: bool, compensation_refused: str | None, shared_layers: list[int],
                 channels_refused: str | None = None) -> tuple[dict, list[str]]:
    """A preset's ``options`` changed where the model cannot take them, and one line per change saying why.

    ``language_model``: the model predicts next tokens (EEP's fitness is their NLL; otherwise REAP, uniform, the
    best pipeline measured without it); ``compensation_refused``: why the family cannot be compensated (None: it
    can); ``shared_layers``: decoder layers with several expert blocks, which keep equal counts (no global
    allocation); ``channels_refused``: why channels cannot be scored in this family (then experts alone: dropping
    experts removes the same share of routed parameters).
    """
    options, why = dict(options), []
    if options.get("granularity") == "channel" and channels_refused:
        options = {"method": "reap", "allocation": "uniform", "compensate": options.get("compensate", False)}
        why.append(f"--method reap --allocation uniform (experts only, --ratio of them): {channels_refused}")
    if options.get("method") == "eep" and not language_model:
        options.update(method="reap", allocation="uniform")
        why.append("--method reap --allocation uniform: EEP's fitness is the next-token NLL and this model is not a causal language model")
    if options.get("compensate") and compensation_refused:
        options["compensate"] = False
        why.append(f"no --compensate: {compensation_refused}")
    if options.get("allocation") == "global" and shared_layers:
        options["allocation"] = "uniform"
        why.append(f"--allocation uniform: decoder layers {shared_layers[:4]} hold several expert blocks, which keep equal counts")
    return options, why


def preset_options(name: str, *, streamed: bool = False) -> dict:
    """The options preset ``name`` stands for (keys as ``moe-fx prune``'s argument names), for an in-memory or a
    streamed prune; a one-line error for an unknown name."""
    if name not in PRESETS:
        raise BadOptionError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return dict(preset.streamed if streamed else preset.options)
