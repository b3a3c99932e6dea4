"""Typed prompts in voxel coordinates on one slice, and the one place that converts them
to Segment Anything's (x = column, y = row) convention.

A :class:`SlicePrompt` belongs to slice ``index`` along array ``axis`` (see :mod:`volume`).
Points and boxes are in that slice's pixel coordinates (row, col). A mask is a boolean array of
the slice's shape. Several prompts on different slices of one object are its anchors.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import PromptError
from .volume import AXIS_NAMES, kji_to_slice


@dataclass(frozen=True)
class Point:
    """A click at pixel (row, col); ``positive`` is include, otherwise exclude."""

    row: float
    col: float
    positive: bool = True

    def __post_init__(self) -> None:
        _check_coordinates(self, ("row", "col"))
        if self.positive not in (True, False):
            raise PromptError(f"Point.positive must be True (include) or False (exclude); got {self.positive!r}.")


@dataclass(frozen=True)
class Box:
    """A box with inclusive pixel bounds: rows row0..row1, cols col0..col1."""

    row0: float
    col0: float
    row1: float
    col1: float

    def __post_init__(self) -> None:
        _check_coordinates(self, ("row0", "col0", "row1", "col1"))

    def normalised(self) -> "Box":
        return Box(min(self.row0, self.row1), min(self.col0, self.col1),
                   max(self.row0, self.row1), max(self.col0, self.col1))


def _check_coordinates(prompt, names: tuple[str, ...]) -> None:
    values = [getattr(prompt, name) for name in names]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v) for v in values):
        given = ", ".join(f"{name}={value!r}" for name, value in zip(names, values))
        raise PromptError(f"{type(prompt).__name__} needs finite numbers (pixel coordinates); got {given}.")


@dataclass(frozen=True, eq=False)
class SlicePrompt:
    """Everything the user gave on one slice: points, an optional box, an optional mask."""

    axis: int
    index: int
    points: tuple[Point, ...] = ()
    box: Box | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_positive_input(self) -> bool:
        return (
            any(p.positive for p in self.points)
            or self.box is not None
            or (self.mask is not None and bool(np.any(self.mask)))
        )

    @property
    def is_mask_only(self) -> bool:
        """A mask with no clicks or box: the slice's result is the mask itself."""
        return self.mask is not None and not self.points and self.box is None

    def merged(self, other: "SlicePrompt") -> "SlicePrompt":
        """This prompt with ``other``'s points added (a new click replaces an earlier one on the
        same pixel); ``other``'s box and mask replace ours."""
        if (other.axis, other.index) != (self.axis, self.index):
            raise PromptError("Only prompts on the same slice can be merged.")
        clicked = {_pixel(p) for p in other.points}
        return replace(
            self,
            points=tuple(p for p in self.points if _pixel(p) not in clicked) + other.points,
            box=other.box if other.box is not None else self.box,
            mask=other.mask if other.mask is not None else self.mask,
        )

    def validate(self, volume_shape: tuple[int, int, int]) -> None:
        """Raise :class:`PromptError` with advice if this prompt cannot be used on the volume."""
        if self.axis not in (0, 1, 2) or isinstance(self.axis, bool):
            raise PromptError(f"Prompt axis must be 0, 1 or 2 (array axes k, j, i); got {self.axis!r}.")
        if not isinstance(self.index, numbers.Integral) or isinstance(self.index, bool):
            raise PromptError(f"Prompt slice index must be an integer; got {self.index!r}.")
        if not all(isinstance(p, Point) for p in self.points) or (
            self.box is not None and not isinstance(self.box, Box)
        ):
            raise PromptError("Prompt points must be Point(row, col) objects and its box a Box(row0, col0, row1, col1).")
        n_slices = volume_shape[self.axis]
        if not 0 <= self.index < n_slices:
            raise PromptError(
                f"Prompt is on slice {self.index} along {AXIS_NAMES[self.axis]}, but the volume has "
                f"slices 0..{n_slices - 1} along that axis. Click inside the volume."
            )
        rows, cols = slice_shape(volume_shape, self.axis)
        for p in self.points:
            if not (-0.5 <= p.row < rows - 0.5 and -0.5 <= p.col < cols - 0.5):
                raise PromptError(
                    f"Point (row {p.row:g}, col {p.col:g}) is outside the {rows} x {cols} slice. "
                    "Click inside the image."
                )
        included = {_pixel(p) for p in self.points if p.positive}
        for p in self.points:
            if not p.positive and _pixel(p) in included:
                raise PromptError(
                    f"The pixel (row {_pixel(p)[0]}, col {_pixel(p)[1]}) is both an include and an exclude click; "
                    "remove one of them."
                )
        if self.box is not None:
            b = self.box.normalised()
            where = f"rows {b.row0:g}..{b.row1:g}, cols {b.col0:g}..{b.col1:g}"
            if b.row1 - b.row0 < 1 or b.col1 - b.col0 < 1:
                raise PromptError(
                    f"The box ({where}) is degenerate: less than one pixel wide or high. Drag a larger box."
                )
            if b.row1 < 0 or b.col1 < 0 or b.row0 > rows - 1 or b.col0 > cols - 1:
                raise PromptError(f"The box ({where}) lies outside the {rows} x {cols} slice.")
        if self.mask is not None:
            if not isinstance(self.mask, np.ndarray) or not (
                self.mask.dtype == bool or np.isin(self.mask, (0, 1)).all()
            ):
                raise PromptError("A mask prompt must be a boolean (or 0/1) array of the slice's shape.")
            if self.mask.shape != (rows, cols):
                raise PromptError(
                    f"Mask prompt has shape {self.mask.shape}, but slices along "
                    f"{AXIS_NAMES[self.axis]} are {rows} x {cols}."
                )
            if self.is_mask_only and not np.any(self.mask):
                raise PromptError(
                    f"The mask prompt on slice {self.index} is empty. Paint the object on that slice first."
                )
        if not self.has_positive_input:
            raise PromptError(
                "The prompt has no positive input: add an include click, a box, or a non-empty mask."
            )


def _pixel(point: Point) -> tuple[int, int]:
    return round(point.row), round(point.col)


def slice_shape(volume_shape: tuple[int, int, int], axis: int) -> tuple[int, int]:
    """(rows, cols) of a slice along ``axis``."""
    remaining = [s for a, s in enumerate(volume_shape) if a != axis]
    return remaining[0], remaining[1]


def prompt_from_voxels(
    axis: int,
    positive_kji=(),
    negative_kji=(),
    box_kji: tuple | None = None,
) -> SlicePrompt:
    """A slice prompt from 3D voxel coordinates (k, j, i) that all lie on one slice.

    ``box_kji`` is two opposite corners ((k, j, i), (k, j, i)) on that slice.
    """
    located = [(kji_to_slice(axis, p), True) for p in positive_kji]
    located += [(kji_to_slice(axis, p), False) for p in negative_kji]
    corners = [kji_to_slice(axis, c) for c in box_kji] if box_kji is not None else []
    indices = {int(round(s[0])) for s, _ in located} | {int(round(c[0])) for c in corners}
    if not indices:
        raise PromptError("No positive input: give at least one include point or a box.")
    if len(indices) > 1:
        raise PromptError(
            f"Points and box must lie on one slice along {AXIS_NAMES[axis]}; they are on slices "
            f"{sorted(indices)}. Give one prompt per slice."
        )
    points = tuple(Point(float(r), float(c), positive) for (_, r, c), positive in located)
    box = None
    if corners:
        (_, r0, c0), (_, r1, c1) = corners
        box = Box(float(r0), float(c0), float(r1), float(c1)).normalised()
    return SlicePrompt(axis=axis, index=indices.pop(), points=points, box=box)


# --- the one place that converts to Segment Anything's (x = column, y = row) convention ---

def points_xy(points: tuple[Point, ...] | list[Point]) -> tuple[np.ndarray, np.ndarray]:
    """Point coordinates as an (N, 2) float array of (x = col, y = row) and labels (1 / 0)."""
    coords = np.array([[p.col, p.row] for p in points], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1 if p.positive else 0 for p in points], dtype=np.int32)
    return coords, labels


def box_xyxy(box: Box) -> np.ndarray:
    """Box as (x0, y0, x1, y1) = (col0, row0, col1, row1)."""
    b = box.normalised()
    return np.array([b.col0, b.row0, b.col1, b.row1], dtype=np.float32)
