"""Progress bars for long merges and exports: tqdm when it is installed, nothing otherwise."""

from __future__ import annotations

import sys


def progress(iterable, *, desc: str, total: int | None = None, enable: bool | None = None):
    """``iterable`` wrapped in a tqdm bar when ``enable`` (None: when tqdm is installed and stderr is a terminal)."""
    if enable is False or (enable is None and not sys.stderr.isatty()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
