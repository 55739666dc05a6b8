"""ChooseRecipe for a model streamed one layer at a time: every candidate streamed to its own output, measured there.

Why: which split of a parameter budget between whole experts and channels is best depends on the model (at 25% of a
Mixtral's routed parameters, experts lost 0.79x REAP's loss and channels 1.25x; on a Qwen2-MoE channels were best), and
the models that must be streamed are the ones people prune for real. In memory, :class:`~moe_fx.plan.choose.ChooseRecipe`
measures each candidate on a view of the model; a streamed prune never holds the model, so here each candidate is a
whole streamed prune into a directory beside the output, and its fitness is the NLL of that pruned checkpoint on the
held-out calibration windows, itself streamed (:func:`~moe_fx.run.streaming.stream_evaluate`). The lowest is renamed to
the output; the others are deleted as soon as one beats them, so at most two candidates' outputs are on disk at once.

The passes are ``[Calibrate, <prefix>, ChooseRecipe(candidates), <suffix>]``; each candidate streams ``Calibrate,
<prefix>, <its passes>, <suffix>`` with the same calibration windows, so the kept output is exactly what streaming its
recipe alone writes (deterministic passes), and its fitness is that output's NLL.

Cost: one streamed prune per candidate (calibration forwards included: a non-sequential run could share them, not
done) and one streamed evaluation of the fitness windows (16,384 tokens by default) per candidate. One process only:
under ``torchrun`` only rank 0 writes, and the others would wait on its evaluations.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from moe_fx.calibrate import distributed
from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import EvalSet
from moe_fx.evaluate.report import write_report
from moe_fx.formats.atomic import move_into_place
from moe_fx.formats.checkpoint import check_output_path, update_record
from moe_fx.pipeline import Pass, PassRecord
from moe_fx.plan.choose import ChooseRecipe

__all__ = ["stream_choose"]


def stream_choose(source: str | Path, out: str | Path, passes: Sequence[Pass], *, overwrite: bool = False, show_progress: bool = True,
                  report: bool = True, **stream_options):
    """Stream each candidate of the one :class:`ChooseRecipe` in ``passes`` to its own directory, keep the one whose
    output has the lowest NLL on the recipe's held-out windows as ``out`` (see the module doc); returns the kept run's
    :class:`~moe_fx.run.streaming.StreamReport` (its ``seconds``: the whole choice), whose state's history ends with
    the ``choose_recipe`` record in-memory runs write. ``stream_options``: :func:`~moe_fx.run.streaming.stream_prune`'s
    (``device``, ``dtype``, ``tokenizer``, ``sequential``, ...), the same for every candidate."""
    from moe_fx.run.streaming import stream_evaluate, stream_prune  # it hands its ChooseRecipe passes here

    at = [i for i, p in enumerate(passes) if isinstance(p, ChooseRecipe)]
    if len(at) != 1:
        raise BadOptionError(f"stream_choose takes exactly one ChooseRecipe among the passes, got {len(at)}")
    if distributed.active():
        raise BadOptionError("ChooseRecipe streamed measures every candidate's output in one process: run it without torchrun / --nproc")
    if stream_options.get("teacher_cache") is not None:
        raise BadOptionError("ChooseRecipe streamed writes several candidates; cache the teacher in a separate streamed pass")
    t0 = time.perf_counter()
    choose, prefix, suffix = passes[at[0]], list(passes[: at[0]]), list(passes[at[0] + 1 :])
    source, out = Path(source), check_output_path(out, source, overwrite)
    device, dtype = stream_options.get("device", "cpu"), stream_options.get("dtype", "auto")
    tokens = calibration_tokens(choose.data, choose.tokenizer or stream_options.get("tokenizer"), seq_len=choose.seq_len,
                                max_tokens=choose.max_tokens).input_ids
    held_out = EvalSet({"fitness": tokens}, source="held-out calibration windows")
    fitness: dict[str, float] = {}
    best: tuple[str, object, Path] | None = None
    staged: list[Path] = []
    try:
        for i, (label, candidate) in enumerate(choose.candidates.items()):
            if show_progress:
                print(f"moe-fx: choose recipe, candidate {i + 1} of {len(choose.candidates)}: {label}", flush=True)
            staging = out.with_name(f".{out.name}.candidate-{i}")
            staged.append(staging)
            run = stream_prune(source, staging, [*prefix, *candidate, *suffix], overwrite=True, show_progress=show_progress, report=False,
                               **stream_options)
            fitness[label] = stream_evaluate(staging, held_out, device=device, dtype=dtype, batch_size=choose.batch_size,
                                             show_progress=show_progress)["all"]["nll"]
            if best is None or fitness[label] < fitness[best[0]]:  # the first of equals, as in memory
                if best is not None:
                    shutil.rmtree(best[2])
                best = (label, run, staging)
            else:
                shutil.rmtree(staging)
    except BaseException:
        for staging in staged:  # finished candidates; the one interrupted keeps its .partial beside them for a resume
            shutil.rmtree(staging, ignore_errors=True)
        raise
    label, run, staging = best
    move_into_place(staging, out)
    run.out, run.seconds = out, time.perf_counter() - t0
    chosen = {"chosen": label, "fitness": fitness, "fitness_tokens": int(tokens[:, 1:].numel()), "streamed": True}
    run.state.history.append(PassRecord(choose.name, choose.config_dict(), run.seconds, True, chosen))
    update_record(out, {"passes": run.state.record()["passes"]})
    if report:
        write_report(out)
    return run
