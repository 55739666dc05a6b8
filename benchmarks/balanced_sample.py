"""A per-domain balanced sample of a JSON-lines corpus (``domain`` and ``text`` fields), small enough to carry to
the GPU machine: per domain, documents in a seeded random order until the domain has more than ``--chars``
characters; then all of them shuffled. Made ``benchmarks/results/distill_h200/``'s calibration file.

    python benchmarks/balanced_sample.py ../shared/data/corpus/train.jsonl.gz .device/data/train_subset.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--chars", type=int, default=260_000, help="characters per domain, at least")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    by_domain: dict[str, list[str]] = defaultdict(list)
    with gzip.open(args.source, "rt") as f:
        for line in f:
            if line.strip():
                by_domain[json.loads(line)["domain"]].append(line.rstrip("\n"))
    rng, out = random.Random(args.seed), []
    for domain, lines in sorted(by_domain.items()):
        rng.shuffle(lines)
        chars = 0
        for line in lines:
            if chars > args.chars:
                break
            out.append(line)
            chars += len(json.loads(line)["text"])
        print(f"{domain}: {chars:,} characters")
    rng.shuffle(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
