"""EEP-style evolutionary search over which experts each block keeps (gradient-free).

After Liu et al., 2024, "Efficient Expert Pruning for Sparse Mixture-of-Experts Language Models: Enhancing
Performance and Reducing Inference Costs" (EEP). Scorers rank experts block by block from statistics; the
error that matters is end to end: a block's error changes what later blocks see, and dropping an expert
re-routes its tokens to others. So the search's fitness is the pruned model's mean next-token NLL on a small
held-out slice of the calibration data (lower is better), measured exactly: each candidate is the model with
its experts really dropped, built as a *shallow* copy that shares every tensor with the source and replaces
only the experts' tensors, so one candidate costs one forward pass over the fitness tokens and no copies.

Search: a population of plans, warm-started from a scorer's ranking (REAP, SHAPE, ...): the scorer's plan and
mutations of it. Each generation makes as many new children as the population, each a crossover of two tournament-selected parents (each block's kept set from one parent) and/or a mutation:
swap a kept expert for a dropped one in a block, biased towards the scorer's boundary (weak kept, strong
dropped), or, with ``allocation="global"``, move a slot from one block to another (per-layer counts vary,
the total stays on budget). Parents and children compete for the next population (mu + lambda), so the
best plan is never lost. Fitness is cached per plan; a plan is never evaluated twice.

Cost: ``evaluations x fitness tokens`` forward tokens (default about 16 x 21 plans of 16,384 tokens: 5.5 M
tokens; about 1 min on an H100 for a 30 M-parameter model, tens of minutes on 2 CPU cores). The fitness set
must be large enough not to be overfitted: with 4,096 tokens the search improved its own fitness by 0.07
nats but not held-out NLL (benchmarks/expert_pruning.py). Deterministic for a fixed seed. Under
torch.distributed (torchrun, ``--nproc``) each rank measures its share of every generation's new plans and
the fitness values are all-reduced, so N ranks search N times as fast and take the single-process steps.
Merge coefficients (folding dropped experts into kept ones inside the search) are not searched here;
``MergeExperts(plan=...)`` can fold the dropped experts after the search.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_fx.calibrate import distributed
from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import nll_sum
from moe_fx.model.mode import eval_mode
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.pipeline import STATE_ATTR, MoEState, Pass
from moe_fx.plan.allocate import experts_to_keep, make_plan
from moe_fx.plan.plans import PrunePlan
from moe_fx.progress import progress_bar
from moe_fx.rewrite.drop_experts import drop_experts

Genome = tuple[tuple[int, ...], ...]
"""One candidate: per block (in spec order), the sorted ids of the kept experts."""


def shared_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules and config that shares every parameter and buffer with it, without its moe-fx
    state: rewrites that replace tensors (dropping experts, pruning channels, compensation) change the view alone."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    memo[id(getattr(model, STATE_ATTR, None))] = None
    return copy.deepcopy(model, memo)


def pruned_view(model: nn.Module, spec: MoEModelSpec, plan: PrunePlan, refine: Pass | None = None, stats=None) -> nn.Module:
    """The model with ``plan`` applied, sharing every tensor it keeps with ``model`` (which is unchanged);
    ``refine`` (e.g. CompensateExperts, reading ``stats``) then rewrites the view's own expert tensors."""
    view = shared_view(model)
    new_spec = drop_experts(view, spec, plan, update_config=False)
    if refine is not None:
        state = MoEState(new_spec, spec, stats=stats, plan=plan)
        refine.requires(state)
        refine.run(view, state)
    return view


@dataclass
class SearchResult:
    """The best plan found, its fitness, the warm start's fitness and the best fitness per generation."""

    plan: PrunePlan
    fitness: float
    start_fitness: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "fitness": self.fitness,
            "start_fitness": self.start_fitness,
            "history": self.history,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class EvolutionarySearch:
    """Options of the evolutionary plan search; ``search`` runs it. Use as ``DropExperts(allocation=...)``.

    ``data``: fitness tokens (a TokenBatch, a LongTensor ``[N, L]``, texts or a path; held out from calibration).
    ``allocation``: ``uniform`` (same count per block) or ``global`` (counts move between blocks).
    ``max_evals`` / ``max_seconds``: stop early once either budget is spent (checked before each candidate's
    fitness evaluation, so the search overruns ``max_seconds`` by at most one evaluation; the warm start is
    always measured).
    ``refine``: a pass applied to every candidate before its fitness is measured (``CompensateExperts()``),
    so the search picks the plan that is best *after* the rewrite that will follow it (costs one refine
    per candidate).
    """

    data: Any = None
    tokenizer: Any = None
    seq_len: int = 512
    max_tokens: int = 16384
    population: int = 16
    generations: int = 20
    crossover: float = 0.5
    mutation_swaps: int = 2
    move_prob: float = 0.3
    allocation: str = "uniform"
    max_evals: int | None = None
    max_seconds: float | None = None
    batch_size: int = 8
    seed: int = 0
    show_progress: bool = True
    refine: Any = None

    def to_dict(self) -> dict:
        """The search options (the data is summarised by the pass record, not dumped)."""
        out = {k: v for k, v in vars(self).items() if k not in ("data", "tokenizer", "refine")}
        return out | {"refine": self.refine.config_dict() | {"name": self.refine.name} if self.refine is not None else None}

    def _check(self) -> None:
        if self.data is None:
            raise BadOptionError("EvolutionarySearch needs data: fitness tokens held out from the calibration data")
        if self.allocation not in ("uniform", "global"):
            raise BadOptionError(f"unknown allocation {self.allocation!r}; use 'uniform' or 'global'")
        if self.population < 2 or self.generations < 1:
            raise BadOptionError(f"need population >= 2 and generations >= 1; got {self.population} and {self.generations}")

    def search(
        self, model: nn.Module, spec: MoEModelSpec, scores: dict[str, torch.Tensor] | None, *, ratio: float | None = None,
        keep: int | None = None, stats=None,
    ) -> SearchResult:
        self._check()
        tokens = calibration_tokens(self.data, self.tokenizer, seq_len=self.seq_len, max_tokens=self.max_tokens, seed=self.seed)
        rng = random.Random(self.seed)
        if scores is None:  # no scorer ran: a seeded random ranking
            gen = torch.Generator().manual_seed(self.seed)
            scores = {b.path: torch.rand(b.num_experts, generator=gen, dtype=torch.float64) for b in spec.blocks}
        ops = _Operators(spec, scores, rng, self.move_prob if self.allocation == "global" else 0.0)
        budget = sum(experts_to_keep(b.num_experts, ratio, keep) for b in spec.blocks)
        start = ops.genome(make_plan(spec, scores, ratio=ratio, keep=keep, allocation=self.allocation))
        if self.allocation == "global":
            budget = sum(map(len, start))
        cache: dict[Genome, float] = {}
        t0 = time.perf_counter()

        def measure(genomes) -> None:
            """Fitness of every genome not measured yet, until the budget is spent: the clock and the evaluation
            count are checked before each candidate, so ``max_seconds`` is overrun by at most one fitness
            evaluation. Under torch.distributed each rank measures every world-th one and the values are shared
            (sums over ranks of one-hot vectors, with a flag per measured genome), so every rank holds the same
            cache and takes the same search steps."""
            new = sorted({g for g in genomes if g not in cache})
            values = torch.zeros(len(new), dtype=torch.float64)
            measured = torch.zeros(len(new), dtype=torch.float64)
            for i in range(distributed.rank(), len(new), distributed.world_size()):
                if cache and self._over(len(cache) + int(measured.sum()) * distributed.world_size(), time.perf_counter() - t0):
                    break
                view = pruned_view(model, spec, ops.plan(new[i]), self.refine, stats)
                s, n = nll_sum(view, tokens.input_ids, batch_size=self.batch_size)
                values[i], measured[i] = s / n, 1.0
            if distributed.active():
                distributed.all_reduce_sum_(values)
                distributed.all_reduce_sum_(measured)
            cache.update((g, v) for g, v, m in zip(new, values.tolist(), measured.tolist()) if m > 0)

        with eval_mode(model):
            measure([start])  # the warm start is always measured: the search returns a plan either way
            pop = [start] + [ops.mutate(start, rng.randint(1, 2 * self.mutation_swaps), budget) for _ in range(self.population - 1)]
            measure(pop)
            rank = lambda g: (cache[g], g)
            pop = sorted({g for g in pop if g in cache}, key=rank)
            history = [cache[pop[0]]]
            with progress_bar("eep search", total=self.generations, unit="gen", enabled=self.show_progress and distributed.is_main()) as bar:
                for _ in range(self.generations):
                    if self._spent(len(cache), time.perf_counter() - t0):
                        break
                    children: set[Genome] = set()
                    for _ in range(self.population * 4):  # bounded tries: small spaces may have few new plans
                        if len(children) >= self.population:
                            break
                        child = self._child(pop, ops, rng, budget)
                        if child not in cache:
                            children.add(child)
                    # (mu + lambda): parents and children compete, so the best plan is never lost
                    measure(children)
                    pop = sorted(set(pop) | {c for c in children if c in cache}, key=rank)[: self.population]
                    history.append(cache[pop[0]])
                    bar.update(1)
                    bar.set_postfix(best=f"{history[-1]:.4f}", start=f"{cache[start]:.4f}", evals=len(cache))
        return SearchResult(ops.plan(pop[0]), cache[pop[0]], cache[start], history, len(cache), time.perf_counter() - t0)

    def _over(self, evals: int, seconds: float) -> bool:
        """Whether ``evals`` evaluations or ``seconds`` of search reach ``max_evals`` / ``max_seconds`` (this rank's view)."""
        return (self.max_evals is not None and evals >= self.max_evals) or (self.max_seconds is not None and seconds >= self.max_seconds)

    def _spent(self, evals: int, seconds: float) -> bool:
        """Whether the budget is used up; across ranks, as soon as one rank's clock says so (all stop together)."""
        spent = self._over(evals, seconds)
        if distributed.active():
            flag = torch.tensor([float(spent)])
            distributed.all_reduce_sum_(flag)
            spent = bool(flag.item() > 0)
        return spent

    def _child(self, pop: list[Genome], ops: _Operators, rng: random.Random, budget: int) -> Genome:
        tournament = lambda: min(rng.sample(range(len(pop)), min(3, len(pop))))
        child = pop[tournament()]
        if rng.random() < self.crossover:
            child = ops.crossover(child, pop[tournament()], budget)
            if rng.random() < 0.5:
                return child
        return ops.mutate(child, rng.randint(1, self.mutation_swaps), budget)


class _Operators:
    """Mutation, crossover and budget repair on genomes, keeping every block runnable (>= top-k experts,
    equal counts per group for group-limited routing)."""

    def __init__(self, spec: MoEModelSpec, scores: dict[str, torch.Tensor], rng: random.Random, move_prob: float) -> None:
        self.blocks: list[MoEBlockSpec] = list(spec.blocks)
        # experts of each block from most to least important by the warm-start scores
        self.order = [sorted(range(b.num_experts), key=lambda i, b=b: (-float(scores[b.path][i]), i)) for b in self.blocks]
        self.rng = rng
        self.move_prob = move_prob
        self.movable = [i for i, b in enumerate(self.blocks) if (b.router.n_group or 1) == 1] if move_prob > 0 else []

    def genome(self, plan: PrunePlan) -> Genome:
        return tuple(tuple(sorted(plan.kept_experts[b.path])) for b in self.blocks)

    def plan(self, genome: Genome) -> PrunePlan:
        return PrunePlan({b.path: list(kept) for b, kept in zip(self.blocks, genome)})

    def _pick(self, candidates: list[int]) -> int:
        """A geometric draw over ``candidates`` (ordered most likely first): search near the scorer's boundary."""
        i = 0
        while i < len(candidates) - 1 and self.rng.random() > 0.35:
            i += 1
        return candidates[i]

    def _weak_kept(self, b: int, kept: set[int]) -> int:
        return self._pick([e for e in reversed(self.order[b]) if e in kept])

    def _strong_dropped(self, b: int, kept: set[int], group_of: int | None = None) -> int | None:
        block = self.blocks[b]
        size = block.num_experts // (block.router.n_group or 1)
        cands = [e for e in self.order[b] if e not in kept and (group_of is None or e // size == group_of // size)]
        return self._pick(cands) if cands else None

    def swap(self, genome: Genome) -> Genome:
        b = self.rng.randrange(len(self.blocks))
        kept = set(genome[b])
        out = self._weak_kept(b, kept)
        grouped = (self.blocks[b].router.n_group or 1) > 1
        add = self._strong_dropped(b, kept, out if grouped else None)
        if add is None:
            return genome
        return genome[:b] + (tuple(sorted(kept - {out} | {add})),) + genome[b + 1 :]

    def move(self, genome: Genome, src: int | None = None, dst: int | None = None) -> Genome:
        """Move one kept slot from block ``src`` to block ``dst`` (random movable blocks by default)."""
        g = list(genome)
        src = self.rng.choice(self.movable) if src is None else src
        dst = self.rng.choice(self.movable) if dst is None else dst
        if src == dst or len(g[src]) <= self.blocks[src].top_k or len(g[dst]) >= self.blocks[dst].num_experts:
            return genome
        kept = set(g[src])
        g[src] = tuple(sorted(kept - {self._weak_kept(src, kept)}))
        kept = set(g[dst])
        g[dst] = tuple(sorted(kept | {self._strong_dropped(dst, kept)}))
        return tuple(g)

    def mutate(self, genome: Genome, steps: int, budget: int) -> Genome:
        for _ in range(steps):
            genome = self.move(genome) if self.movable and self.rng.random() < self.move_prob else self.swap(genome)
        return self.repair(genome, budget)

    def crossover(self, a: Genome, b: Genome, budget: int) -> Genome:
        return self.repair(tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b)), budget)

    def repair(self, genome: Genome, budget: int) -> Genome:
        """Bring a global-allocation genome back to the total budget by moving slots (uniform ones never drift)."""
        for _ in range(10 * len(self.blocks) * max(len(k) for k in genome)):
            total = sum(map(len, genome))
            if total == budget or not self.movable:
                break
            sizes = {i: len(genome[i]) for i in self.movable}
            if total > budget:
                src = max((i for i in self.movable if sizes[i] > self.blocks[i].top_k), key=lambda i: (sizes[i], self.rng.random()), default=None)
                if src is None:
                    break
                kept = set(genome[src])
                genome = genome[:src] + (tuple(sorted(kept - {self._weak_kept(src, kept)})),) + genome[src + 1 :]
            else:
                dst = min((i for i in self.movable if sizes[i] < self.blocks[i].num_experts), key=lambda i: (sizes[i], self.rng.random()), default=None)
                if dst is None:
                    break
                kept = set(genome[dst])
                genome = genome[:dst] + (tuple(sorted(kept | {self._strong_dropped(dst, kept)})),) + genome[dst + 1 :]
        return genome
