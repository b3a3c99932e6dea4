"""Which slices a propagation must (re)compute, given the anchor slices of one object.

Between two neighbouring anchors the slices are filled from both ends and meet in the middle;
beyond the outermost anchors a run goes outwards until the stop rule or the slice range ends it.
After a correction only the runs that start at, or head towards, a changed anchor are planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from ..errors import PromptError

Direction = Literal["both", "forward", "backward"]


@dataclass(frozen=True)
class Run:
    """Slices ``start + step`` .. ``end`` (inclusive), computed in order from anchor ``start``.

    ``toward`` is the anchor the run heads to (it stops halfway), or None for an outer run.
    """

    start: int
    step: int
    end: int
    toward: int | None = None

    @property
    def slices(self) -> range:
        return range(self.start + self.step, self.end + self.step, self.step)


def plan_runs(
    anchors: Iterable[int],
    n_slices: int,
    direction: Direction = "both",
    slice_range: tuple[int, int] | None = None,
    changed: Iterable[int] | None = None,
) -> list[Run]:
    """Runs to compute. ``changed`` limits them to runs touching those anchors (None: all).

    ``direction`` applies to the outer runs (forward = increasing slice index); slices between
    two anchors are always filled from both ends. ``slice_range`` is inclusive.
    """
    if direction not in ("both", "forward", "backward"):
        raise PromptError(f"Direction must be 'both', 'forward' or 'backward'; got {direction!r}.")
    lo, hi = (0, n_slices - 1) if slice_range is None else slice_range
    lo, hi = max(0, int(lo)), min(n_slices - 1, int(hi))
    if lo > hi:
        raise PromptError(f"Slice range {slice_range} is empty for a volume with {n_slices} slices.")
    inside = sorted({a for a in anchors if lo <= a <= hi})
    if not inside:
        raise PromptError(
            f"No prompted slice lies inside the slice range {lo}..{hi}. Prompt a slice in the range "
            "or widen the range."
        )
    runs: list[Run] = []
    if direction in ("both", "backward") and inside[0] > lo:
        runs.append(Run(inside[0], -1, lo))
    for a, b in zip(inside, inside[1:]):
        if b - a < 2:
            continue
        middle = (a + b) // 2
        runs.append(Run(a, +1, middle, toward=b))
        if middle + 1 <= b - 1:
            runs.append(Run(b, -1, middle + 1, toward=a))
    if direction in ("both", "forward") and inside[-1] < hi:
        runs.append(Run(inside[-1], +1, hi))
    if changed is None:
        return runs
    changed = set(changed)
    return [r for r in runs if r.start in changed or r.toward in changed]
