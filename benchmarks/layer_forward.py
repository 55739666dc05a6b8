"""Where one streamed layer's calibration forward goes (GPU): the layer alone, with the REAP observers, and with the
``inputs`` sample (compensation, obs) kept in CPU memory or on the GPU; under the model's own attention and under
:func:`moe_fx.model.attention.calibration_attention` (GPT-OSS's sinks through fused kernels); and the relative
difference of each one's layer output (bfloat16) from the layer's float32 output under its own attention.

    python benchmarks/layer_forward.py --preset gpt-oss-20b --batches 16 --out benchmarks/results/scale_h200/layer_forward_gpt-oss-20b_h100.json

One layer of a ``synth_checkpoint.py`` preset (random weights, real shapes), batches of 4 x 2048 tokens, each row
the mean of one pass over ``--batches`` batches after a warm-up pass, in ms per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from synth_checkpoint import PRESETS, write_checkpoint

from moe_fx.calibrate import keep_samples_on
from moe_fx.calibrate.observers import InputObserver, ReapObserver, RoutingObserver
from moe_fx.formats.lazy import LazyCheckpoint
from moe_fx.model.attention import calibration_attention
from moe_fx.run.streaming import _open_meta

SHAPE = (4, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/layer_forward"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    source = args.work / args.preset
    if not source.exists():
        write_checkpoint(args.preset, source, layers=1, device="cuda", quiet=True,
                         tokenizer=Path(__file__).resolve().parents[1] / "examples" / "assets" / "qwen3moe-micro")
    result = {"preset": args.preset, "batch": list(SHAPE), "device": torch.cuda.get_device_name()}
    tokens = torch.randint(3, 8000, (SHAPE[0] * args.batches, SHAPE[1]), generator=torch.Generator().manual_seed(0))
    outputs, first_input = {}, None
    for attention, dtype in (("eager", "bfloat16"), ("fused", "bfloat16"), ("reference", "float32")):
        with LazyCheckpoint(source) as ckpt:
            run = _open_meta(source, ckpt, "cuda", dtype, "cpu")
            with calibration_attention(run.model) if attention == "fused" else contextlib.nullcontext(), torch.no_grad():
                run.embed([tokens], SHAPE[0])  # the masks are built here, for the attention in use
                run.load_layer(0)
                spec = run.blocks_of(0)
                first_input = run.states[0] if first_input is None else first_input  # every row reads the same input
                hidden = first_input.to("cuda", run.dtype)
                outputs[attention] = run.calls[SHAPE][0](run.layers[0], hidden, dict(run.own[0])).float()
                if attention == "reference":
                    continue

                def reap() -> list:
                    return [RoutingObserver(), ReapObserver()]

                def on_gpu() -> list:
                    observers = [*reap(), InputObserver(16384)]
                    keep_samples_on(spec, observers, "cuda")
                    return observers

                for name, make in (("layer", list), ("reap", reap), ("reap+inputs(host)", lambda: [*reap(), InputObserver(16384)]),
                                   ("reap+inputs(gpu)", on_gpu)):
                    run.forward(0, make(), spec, hand_on=False)  # warm-up
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run.forward(0, make(), spec, hand_on=False)
                    torch.cuda.synchronize()
                    result[f"{attention}:{name}"] = round((time.perf_counter() - t0) / args.batches * 1000, 2)
    reference = outputs.pop("reference")
    for attention, out in outputs.items():
        result[f"{attention}:relative_difference_from_float32"] = ((out - reference).norm() / reference.norm()).item()
    print(f"{'observers':<20} {'eager ms':>9} {'fused ms':>9}")
    for name in ("layer", "reap", "reap+inputs(host)", "reap+inputs(gpu)"):
        print(f"{name:<20} {result['eager:' + name]:>9.1f} {result['fused:' + name]:>9.1f}")
    print("layer output vs float32: " + ", ".join(f"{a} {result[a + ':relative_difference_from_float32']:.4f}" for a in outputs))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
