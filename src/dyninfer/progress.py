"""Progress bars: one place that decides how every long loop shows its progress.

Every bar goes to stderr, sizes itself to the terminal and is erased when it finishes
(``leave=False``): what a finished phase did is printed by the command as one line. A bar that
stays behind prints a bare newline where the terminal reports no width (a pseudo-terminal
without a size, some CI log viewers), which is the blank line users saw. ``enabled=False``
(the commands' ``--quiet``) shows nothing; output that is not a terminal gets no bar either, so
log files hold lines, not carriage-return updates.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

__all__ = ["bar", "write"]


def bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar with dyninfer's defaults; ``options`` are passed on (``total``, ``initial``, ``unit``...)."""
    return tqdm(iterable, desc=desc, disable=None if enabled else True, leave=False, file=sys.stderr,
                dynamic_ncols=True, **options)


def write(message: str) -> None:
    """A line above any open bar (it is redrawn below), on stderr like the bars."""
    tqdm.write(message, file=sys.stderr)
