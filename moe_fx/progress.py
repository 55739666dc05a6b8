"""Progress bars for long work (calibration, evaluation), shown only on an interactive terminal or when asked."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(desc: str, *, total: int, unit: str, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar with a rate (e.g. tokens/s); disabled bars still count, so callers need no branches."""
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
