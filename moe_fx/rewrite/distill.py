"""Distill: after pruning, fine-tune the pruned model towards the unpruned one's next-token distribution.

What: the teacher (the unpruned model, in memory or loaded from its checkpoint directory) and the pruned
student read the same calibration windows; the student's trainable parameters take ``steps`` AdamW steps on
the mean per-token KL divergence ``KL(teacher || student)`` of the full next-token distributions. Which
parameters move: ``train="experts"`` (default) the routed experts' tensors and the routers (what pruning
changed: the kept experts absorb the dropped ones' work, the router re-learns where to send tokens);
``"routers"``: the routers only (the smallest trainable state); ``"adapters"``: rank-``rank`` adapters on the
routed experts' weights plus the routers and experts' biases, folded into the weights at the end (a stock
checkpoint; :mod:`moe_fx.rewrite.adapters`: the trainable state of full expert training at a few percent of its
memory); ``"all"``: every parameter. The learning rate warms up over the first 5% of the steps, then decays on a cosine.

Why: one-shot rewrites (dropping, merging, channel removal, :class:`CompensateExperts`' block-local refit)
each fix a block on its own; the error that matters is end to end, where a block's error changes what the next
blocks see. Distillation trains on that error directly, with the teacher's whole distribution as the target
(far more signal per token than the next-token label), on the calibration data only: no labels, no other data.

Invariants: weights that are exactly zero before (the zero padding of per-expert widths) are zero after, so a
padded layout stays valid; ``steps=0`` leaves the model untouched; a fixed ``seed`` gives the same windows in
the same order, so the same result on the same device. The source checkpoint is only read.

Cost: ``steps`` x (a teacher forward + a student forward and backward) over ``batch_size`` windows, plus two
AdamW moments per trained parameter, and the teacher in memory next to the student (about 2x the weights;
``teacher`` may be a path, loaded when the pass runs). A step of 8 x 512 tokens of a 29 M-parameter model took
about 3 s on 2 CPU cores and 0.3 s on one H200 (fp32, through the ``eager`` experts loop: see
:func:`_autograd_experts`). Needs the whole model (no streaming).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import BadOptionError, PassOrderError
from moe_fx.kernels import grouped_mm
from moe_fx.kernels.implementation import experts_implementation
from moe_fx.model.mode import eval_mode
from moe_fx.model.spec import MoEModelSpec
from moe_fx.pipeline import MoEState, Pass, PassResult
from moe_fx.progress import progress_bar
from moe_fx.rewrite.adapters import adapter_parameter_count, low_rank_adapters
from moe_fx.rewrite.teacher_cache import TeacherCache, topk_kl

__all__ = ["Distill", "kl_to_teacher", "training_memory"]

TRAINABLE = ("experts", "routers", "adapters", "all")

LEARNING_RATES = {"experts": 3e-4, "routers": 3e-4, "all": 3e-4, "adapters": 3e-3}
"""Peak learning rate per ``train`` mode where none is given, each the better on held-out *train* windows on
qwen3moe-bench (REAP 25% + compensation, 200 steps of 8 x 512 tokens; ``benchmarks/distill_recovery.py``): 3e-4 of
1e-4 and 3e-4 training the experts (with 32 windows a step 1e-3 was better, what ``--preset best`` sets); 3e-3 of
1e-3, 3e-3 and 1e-2 for adapters (rank 4 and 16)."""


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher) || softmax(student))`` in nats, computed in float32."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclass
class Distill(Pass):
    """Fine-tune the pruned model to the unpruned ``teacher``'s logits on ``data`` (see module doc).

    ``compose(Calibrate(data), Score("reap"), DropExperts(ratio=0.25), Distill(teacher="path/to/source", data=data))``.
    ``data``: what :class:`Calibrate` takes (text, documents, a token tensor ``[N, L]``, a TokenBatch);
    ``tokenizer`` is needed for text. ``lr``: peak AdamW learning rate (None: :data:`LEARNING_RATES` for ``train``).
    ``rank``: of each expert's weight update with ``train="adapters"``.
    ``batch_size``: windows per optimizer step; ``micro_batch_size``: windows per forward and backward, their
    gradients summed over the step (activation memory of ``micro_batch_size`` windows, the step of
    ``batch_size``; None: ``batch_size``).
    """

    teacher: Any = None
    data: Any = None
    tokenizer: Any = None
    steps: int = 200
    lr: float | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
    train: str = "experts"
    rank: int = 16
    seq_len: int = 512
    max_tokens: int | None = 200_000
    seed: int = 0
    show_progress: bool = True
    name = "distill"

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default of the ``train`` mode."""
        return self.lr if self.lr is not None else LEARNING_RATES[self.train]

    def _check(self) -> None:
        if self.teacher is None or (self.data is None and not _cached(self.teacher)):
            raise BadOptionError("Distill needs teacher= (the unpruned model, its checkpoint directory, or \"cached\" after CacheTeacher) "
                                 "and data= (calibration windows; a teacher cache brings its own)")
        if self.steps < 0 or self.batch_size < 1 or (self.lr is not None and not self.lr > 0) or (
                self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise BadOptionError(f"Distill: steps must be >= 0, batch_size and micro_batch_size >= 1 and lr > 0, got {self.steps}, "
                                 f"{self.batch_size}, {self.micro_batch_size}, {self.lr}")
        if self.train not in TRAINABLE:
            raise BadOptionError(f"Distill: train must be one of {TRAINABLE}, got {self.train!r}")
        if self.rank < 1:
            raise BadOptionError(f"Distill: rank (of train=\"adapters\") must be >= 1, got {self.rank}")

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        self._check()
        if self.steps == 0:
            return PassResult(model, False, {"steps": 0})
        device = next(model.parameters()).device
        cache = _cache(self.teacher, state)
        if cache is not None:
            windows, teacher = cache.windows, None
        else:
            windows = calibration_tokens(self.data, self.tokenizer, seq_len=self.seq_len, max_tokens=self.max_tokens, seed=self.seed).input_ids
            teacher = _teacher(self.teacher, device, next(model.parameters()).dtype)
            if teacher.config.vocab_size != model.config.vocab_size:
                raise BadOptionError(f"Distill: teacher vocabulary ({teacher.config.vocab_size}) differs from the model's ({model.config.vocab_size}); "
                                     "the teacher must be the model before pruning")
        order = _window_order(windows.shape[0], self.batch_size, self.steps, self.seed)
        losses: list[float] = []
        requires = {p: p.requires_grad for p in model.parameters()}
        try:  # eval mode: no dropout, so the teacher's targets are deterministic, so are the student's
            with eval_mode(model), self._trained(model, state.spec) as (params, direct):
                zeros = {p: zero for p in direct if bool((zero := p == 0).any())}
                # fused on CUDA: the default multi-tensor step allocates temporaries as large as the trained parameters
                # (measured at Qwen3-30B-A3B's shapes, 50% of the experts: 0.84 instead of 0.36 GiB a layer beyond the
                # plan, past an H200 at 48 layers; benchmarks/distill_memory.py)
                fused = all(p.is_cuda for p in params) or None
                optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0, fused=fused)
                schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(self.steps))
                trained = {id(p) for p in params}
                trained_params = sum(p.numel() for p in params)
                for p in model.parameters():
                    p.requires_grad_(id(p) in trained)
                with _autograd_experts(model), progress_bar("distill", total=self.steps, unit="step", enabled=self.show_progress) as bar:
                    micro = self.micro_batch_size or self.batch_size
                    for rows in order:
                        optimizer.zero_grad(set_to_none=True)
                        loss = 0.0
                        for start in range(0, len(rows), micro):  # each part's mean KL weighted by its share of the step
                            part = rows[start:start + micro]
                            part_loss = self._kl(model, teacher, cache, windows, part, device) * (len(part) / len(rows))
                            part_loss.backward()
                            loss += part_loss.detach()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                        schedule.step()
                        with torch.no_grad():
                            for p, mask in zeros.items():
                                p.masked_fill_(mask, 0)
                        losses.append(float(loss))
                        bar.update(1)
                        bar.set_postfix(kl=f"{losses[-1]:.4f}")
                del optimizer  # its moments go before the adapters are folded into the weights
        finally:
            for p, flag in requires.items():
                p.requires_grad_(flag)
            if cache is not None and cache is state.teacher_cache and cache.temporary:
                cache.discard()
                state.teacher_cache = None
        tail = max(1, len(losses) // 10)
        return PassResult(model, True, {
            "steps": self.steps, "teacher": f"cached top-{cache.top_k}" if cache is not None else "model",
            "tokens_per_step": self.batch_size * windows.shape[1], "trained_params": trained_params,
            "lr": self.learning_rate, **({"adapter_rank": self.rank} if self.train == "adapters" else {}),
            "kl_first": round(sum(losses[:tail]) / tail, 6), "kl_last": round(sum(losses[-tail:]) / tail, 6),
        })

    @contextlib.contextmanager
    def _trained(self, model: nn.Module, spec: MoEModelSpec):
        """Yields ``(params, direct)``: what the optimizer moves, and those of them that are model weights (whose exact
        zeros stay zero); adapters are folded into the weights when the block ends."""
        if self.train == "adapters":
            with low_rank_adapters(model, spec, self.rank, seed=self.seed) as (factors, direct):
                yield factors + direct, direct
        else:
            params = _trainable(model, spec, self.train)
            yield params, params

    @staticmethod
    def _kl(model: nn.Module, teacher: nn.Module | None, cache: TeacherCache | None, windows: torch.Tensor, rows: list[int],
            device: torch.device) -> torch.Tensor:
        """The student's mean per-token KL to the teacher (or to its cached top-k) on windows ``rows``."""
        batch = windows[rows].to(device)
        if cache is not None:
            return topk_kl(model(input_ids=batch, use_cache=False).logits, *cache.targets(rows, device))
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits
        return kl_to_teacher(model(input_ids=batch, use_cache=False).logits, target)


def _cached(teacher: Any) -> bool:
    """``teacher`` names a cache: ``"cached"`` (the state's, from CacheTeacher), a TeacherCache, or a cache directory."""
    return (isinstance(teacher, str) and teacher == "cached") or isinstance(teacher, TeacherCache) or (
        isinstance(teacher, (str, Path)) and (Path(teacher) / "cache.json").is_file())


def _cache(teacher: Any, state: MoEState) -> TeacherCache | None:
    """The teacher cache Distill trains on, or None when the teacher is a model."""
    if not _cached(teacher):
        return None
    if isinstance(teacher, TeacherCache):
        return teacher
    if teacher == "cached":
        if state.teacher_cache is None:
            raise PassOrderError('Distill(teacher="cached") needs CacheTeacher earlier in the pipeline, before the pruning passes')
        return state.teacher_cache
    return TeacherCache.open(teacher)


def _teacher(teacher: nn.Module | str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The teacher in eval mode on ``device``: the module itself, or loaded from a checkpoint directory."""
    if isinstance(teacher, (str, Path)):
        from moe_fx.formats.loading import load_model

        teacher = load_model(teacher, dtype=str(dtype).removeprefix("torch."), device=str(device))
    return teacher.eval()


def _autograd_experts(model: nn.Module) -> contextlib.AbstractContextManager:
    """Where torch has no grouped GEMM for the weights (CUDA in fp32/fp16), train through transformers' ``eager``
    experts: the moe_fx operator's weight gradient is a grouped GEMM. Elsewhere the model's own implementation."""
    p = next(model.parameters())
    if grouped_mm.native_supported(p.device, p.dtype):
        return contextlib.nullcontext()
    return experts_implementation(model, "eager", required=False)


def training_memory(model: nn.Module, spec: MoEModelSpec, *, kept_fraction: float, train: str = "experts", rank: int = 16,
                    teacher_in_memory: bool = False) -> dict[str, int]:
    """Bytes Distill holds besides activations, counted before anything is loaded (``model`` may be on the meta
    device, ``spec`` its unpruned spec): the student's weights once ``kept_fraction`` of the routed experts'
    parameters remain, a gradient and two AdamW moments per trained parameter (torch keeps them in the
    parameter's dtype; adapters' factors are float32, their count scaled by ``kept_fraction``), for ``adapters`` the
    effective weights ``W + B A`` of the largest pruned experts module (one layer's at a time, under checkpointing),
    and the teacher's weights when it is a model in memory. What a prune checks against the device before it starts:
    the activations only add to it."""
    from moe_fx.rewrite.prune_channels import routed_parameters

    if train not in TRAINABLE:
        raise BadOptionError(f"Distill: train must be one of {TRAINABLE}, got {train!r}")
    size = next(model.parameters()).element_size()
    total, routed = sum(p.numel() for p in model.parameters()), routed_parameters(model, spec)
    removed = round((1 - kept_fraction) * routed)
    plan = {"student": (total - removed) * size}
    if train == "adapters":
        factors, direct = adapter_parameter_count(model, spec, rank)
        factor_bytes = round(kept_fraction * factors) * 4  # float32
        trained = factor_bytes + direct * size  # the biases counted unpruned: an upper bound
        largest = max(sum(p.numel() for p in model.get_submodule(b.experts.path).parameters()) for b in spec.blocks)
        plan |= {"adapters": factor_bytes, "gradients": trained, "moments": 2 * trained,
                 "adapted_layer": round(kept_fraction * largest) * size}
    else:
        trained = sum(p.numel() for p in _trainable(model, spec, train)) - (removed if train != "routers" else 0)
        plan |= {"gradients": trained * size, "moments": 2 * trained * size}
    return plan | {"teacher": total * size if teacher_in_memory else 0}


def _trainable(model: nn.Module, spec: MoEModelSpec, which: str) -> list[nn.Parameter]:
    """The parameters that move: every one (``all``), those of the routed experts and routers of the spec
    (``experts``), or the routers' alone (``routers``: a trainable state of ``E x H`` a block, what fits beside a
    student of hundreds of GB)."""
    if which == "all":
        return list(model.parameters())
    paths = ("router",) if which == "routers" else ("experts", "router")
    modules = [model.get_submodule(getattr(b, part).path) for b in spec.blocks for part in paths]
    return list(dict.fromkeys(p for m in modules for p in m.parameters()))  # once each, in order


def _warmup_cosine(steps: int):
    warmup = max(1, steps // 20)
    return lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))


def _window_order(windows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of window indices: seeded shuffles of all windows, one epoch after another."""
    rng, order, pool = random.Random(seed), [], []
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, windows):
            if not pool:
                pool = list(range(windows))
                rng.shuffle(pool)
            batch.append(pool.pop())
        order.append(batch)
    return order
