"""Width buckets: a block's per-expert widths grouped into a few widths, each stored by one experts module.

Per-expert widths stored padded save almost nothing; stored exactly they need one experts call per distinct width.
A few buckets keep most of the gain: :func:`plan_buckets` groups the widths so that the stored channels are least.
"""

from __future__ import annotations

from moe_fx.plan.plans import WIDTH_ALIGN

MAX_BUCKETS = 4
"""Buckets per block at most: each is one more experts call per forward of the block."""


def plan_buckets(widths: list[int], max_buckets: int = MAX_BUCKETS, align: int = WIDTH_ALIGN, most: int | None = None) -> list[tuple[int, list[int]]]:
    """``[(width, experts)]``, narrowest first: the experts grouped so that each group stores its widest member's
    width (rounded up to ``align``, at most ``most``) and the total stored width is least, in at most
    ``max_buckets`` groups. An optimal grouping is a run of the distinct widths in order, so dynamic programming over
    the distinct widths finds it (``O(max_buckets x distinct^2)``, whatever the expert count)."""
    rounded = [min(-(-w // align) * align, most or w + align) for w in widths]
    values = sorted(set(rounded))
    count = [sum(1 for r in rounded if r == v) for v in values]
    n = len(values)
    # cost[g][i]: least stored width of the experts of the i narrowest widths in g groups; cut[g][i]: where the last starts
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0
    for g in range(1, max_buckets + 1):
        for i in range(1, n + 1):
            members = 0
            for j in range(i - 1, -1, -1):
                members += count[j]
                c = cost[g - 1][j] + values[i - 1] * members
                if c < cost[g][i]:
                    cost[g][i], cut[g][i] = c, j
    g = min(range(1, max_buckets + 1), key=lambda k: (cost[k][n], k))
    groups, i = [], n
    while i > 0:
        j = cut[g][i]
        within = set(values[j:i])
        groups.append((values[i - 1], [e for e, r in enumerate(rounded) if r in within]))
        i, g = j, g - 1
    return groups[::-1]
