"""Where a streamed prune's time goes: torch.profiler over ``stream_prune`` on a synthetic checkpoint (GPU).

Writes a random-weight checkpoint of a ``synth_checkpoint.py`` preset, runs a recipe (``--recipe``: REAP 50% +
compensation, or half of every expert's channels by ``obs`` + compensation) streamed once to warm up, then once under
the profiler, and prints the operators by CUDA time and by CPU time. It is how GPT-OSS-20B's
slow streamed forward (3 s a layer against Qwen3-30B-A3B's 1.1 s) was traced to host copies rather than compute
(``benchmarks/results/scale_h200/gpt-oss-20b_stream_profile_h100.log``).

    python benchmarks/stream_profile.py --preset gpt-oss-20b --layers 2 --work /tmp/profile
    python benchmarks/stream_profile.py --preset qwen3-30b-a3b --recipe obs-channels50-comp --work /tmp/profile
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import STREAM_RECIPES, streamed_recipe, synthetic_source
from synth_checkpoint import PRESETS
from torch.profiler import ProfilerActivity, profile

from moe_fx.run.streaming import stream_prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--recipe", choices=sorted(STREAM_RECIPES), default="reap50-comp")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu: tiny shapes, a smoke test of this script")
    args = ap.parse_args()
    source, tokens = synthetic_source(args.preset, args.layers, args.work, args.device, args.sequences, args.seq_len)

    def run(out: str) -> float:
        t0 = time.perf_counter()
        stream_prune(source, args.work / out, streamed_recipe(args.recipe, tokens), device=args.device, show_progress=False, overwrite=True)
        return time.perf_counter() - t0

    print(f"warm-up: {run('warm'):.1f} s", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        print(f"profiled: {run('out'):.1f} s", flush=True)
    by = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
