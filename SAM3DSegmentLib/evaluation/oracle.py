"""A measurement double, NOT a model: a 2D "predictor" that answers from the reference mask.

:class:`OraclePredictor` implements the :class:`~SAM3DSegmentLib.engines.slicewise.SlicePredictor`
protocol. Asked for slice ``index`` with a prompt, it returns the reference's 2D connected
components (8-connected) under the prompt: those containing a positive point, those with a pixel
inside the box, and those overlapping the mask input; components under a negative point are
removed. Its score and stability are 1.0 when the answer is non-empty, else 0.0.

Plugged into :class:`~SAM3DSegmentLib.engines.slicewise.SlicewiseSession` it is a perfect 2D model, so
the remaining error is what the propagation logic loses: the projection of one slice's mask into
the next slice's prompt, the stop rule, and the anchors. It is used for evaluation and to choose
defaults; it is never a segmentation engine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.prompts import SlicePrompt
from ..data.volume import get_slice
from ..engines.session import SliceMask
from ..errors import InputError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class OraclePredictor:
    """Answers every prompt with the reference mask's components under it (see module docstring).

    ``slices_encoded`` counts the distinct slices asked for, as a model with an unbounded
    embedding cache would encode them.
    """

    name = "oracle"

    def __init__(self, reference: np.ndarray, axis: int = 0):
        reference = np.asarray(reference, dtype=bool)
        if reference.ndim != 3:
            raise InputError("The oracle needs a 3D reference mask.")
        self.reference = reference
        self.axis = axis
        self.slices_encoded = 0
        self._seen: set[int] = set()

    def predict(self, index: int, prompt: SlicePrompt, previous: SliceMask | None = None) -> SliceMask:
        if index not in self._seen:
            self._seen.add(index)
            self.slices_encoded += 1
        answer = components_under_prompt(get_slice(self.reference, self.axis, index), prompt)
        confident = 1.0 if answer.any() else 0.0
        return SliceMask(answer, score=confident, stability=confident)


def components_under_prompt(reference_slice: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    """The 2D reference components selected by ``prompt`` (points, box, mask)."""
    labels, count = ndimage.label(np.asarray(reference_slice, dtype=bool), structure=EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(labels.shape, dtype=bool)
    rows, cols = labels.shape
    chosen: set[int] = set()

    def label_at(row: float, col: float) -> int:
        r, c = int(round(row)), int(round(col))
        return int(labels[r, c]) if 0 <= r < rows and 0 <= c < cols else 0

    for point in prompt.points:
        if point.positive:
            chosen.add(label_at(point.row, point.col))
    if prompt.box is not None:
        b = prompt.box.normalised()
        r0, r1 = max(0, int(np.floor(b.row0))), min(rows - 1, int(np.ceil(b.row1)))
        c0, c1 = max(0, int(np.floor(b.col0))), min(cols - 1, int(np.ceil(b.col1)))
        chosen.update(np.unique(labels[r0: r1 + 1, c0: c1 + 1]).tolist())
    if prompt.mask is not None:
        chosen.update(np.unique(labels[np.asarray(prompt.mask, dtype=bool)]).tolist())
    for point in prompt.points:
        if not point.positive:
            chosen.discard(label_at(point.row, point.col))
    chosen.discard(0)
    return np.isin(labels, sorted(chosen))
