"""Clicks and boxes from a slice view (RAS) as prompts on the array axis the view looks along."""

from __future__ import annotations

import numpy as np

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import AXIS_NAMES, Volume, kji_to_slice
from SAM3DSegmentLib.errors import PromptError

VIEW_NAMES = {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}


def axis_along_normal(ijk_to_ras: np.ndarray, normal_ras) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) whose voxel direction is closest to ``normal_ras``.

    Works for any direction matrix, including flips and oblique volumes: it compares the
    absolute cosine between the view normal and each IJK column of the matrix.
    """
    normal = np.asarray(normal_ras, dtype=float)[:3]
    if not np.linalg.norm(normal):
        raise PromptError("The slice view has no normal direction.")
    normal = normal / np.linalg.norm(normal)
    columns = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    cosines = [abs(columns[:, c] @ normal) / np.linalg.norm(columns[:, c]) for c in range(3)]
    ijk_column = int(np.argmax(cosines))
    return 2 - ijk_column  # i -> axis 2, j -> axis 1, k -> axis 0


def axis_of_view(slice_to_ras: np.ndarray, ijk_to_ras: np.ndarray) -> int:
    """The array axis a slice view (its SliceToRAS matrix) shows slices of."""
    return axis_along_normal(ijk_to_ras, np.asarray(slice_to_ras)[:3, 2])


def xy_to_ras(xy_to_ras_matrix: np.ndarray, x: float, y: float) -> np.ndarray:
    """RAS of view pixel (x, y) given the slice node's XYToRAS matrix."""
    return (np.asarray(xy_to_ras_matrix, dtype=float) @ np.array([x, y, 0.0, 1.0]))[:3]


def _located(volume: Volume, axis: int, ras) -> tuple[int, float, float]:
    kji = volume.ras_to_kji(ras)
    shape = volume.shape
    if any(c < -0.5 or c > n - 0.5 for c, n in zip(kji, shape)):
        raise PromptError(
            f"The point at RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) is outside volume '{volume.name}'. "
            "Click inside the image."
        )
    index, row, col = kji_to_slice(axis, kji)
    return int(np.clip(round(index), 0, shape[axis] - 1)), float(row), float(col)


def point_prompt(volume: Volume, axis: int, ras, positive: bool = True) -> SlicePrompt:
    """An include (or exclude) click at ``ras`` as a prompt on its slice along ``axis``."""
    index, row, col = _located(volume, axis, ras)
    return SlicePrompt(axis=axis, index=index, points=(Point(row, col, positive),))


def box_prompt(volume: Volume, axis: int, corner0_ras, corner1_ras) -> SlicePrompt:
    """A box between two opposite corners dragged in a view, on the slice of its first corner.

    Corners are clipped to the slice, so a box dragged past the image edge still works.
    """
    index, row0, col0 = _located(volume, axis, corner0_ras)
    kji1 = volume.ras_to_kji(corner1_ras)
    _, row1, col1 = kji_to_slice(axis, kji1)
    rows, cols = [n for a, n in enumerate(volume.shape) if a != axis]
    row1, col1 = float(np.clip(row1, 0, rows - 1)), float(np.clip(col1, 0, cols - 1))
    box = Box(row0, col0, row1, col1).normalised()
    if box.row1 - box.row0 < 1 or box.col1 - box.col0 < 1:
        raise PromptError(
            f"The box on slice {index} along {AXIS_NAMES[axis]} is less than one voxel wide. Drag a larger box."
        )
    return SlicePrompt(axis=axis, index=index, box=box)


def slice_index_at(volume: Volume, axis: int, ras) -> int:
    """The slice along ``axis`` through ``ras`` (e.g. the view's current slice offset)."""
    return _located(volume, axis, ras)[0]


def slice_index_of_view(volume: Volume, axis: int, slice_to_ras) -> int:
    """The slice along ``axis`` that a slice view shows (its plane through the SliceToRAS origin)."""
    origin = np.asarray(slice_to_ras, dtype=float)[:3, 3]
    index = int(round(float(volume.ras_to_kji(origin)[axis])))
    if not 0 <= index < volume.shape[axis]:
        raise PromptError(
            f"The slice view shows no slice of volume '{volume.name}' (slice {index} along {AXIS_NAMES[axis]}). "
            "Scroll to a slice inside the volume."
        )
    return index


def prompt_markers_ras(volume: Volume, prompt: SlicePrompt) -> list[tuple[np.ndarray, bool]]:
    """RAS positions of a prompt's points (to draw markers), with include/exclude flags."""
    from SAM3DSegmentLib.data.volume import slice_to_kji

    return [
        (volume.kji_to_ras(slice_to_kji(prompt.axis, prompt.index, p.row, p.col)), p.positive)
        for p in prompt.points
    ]


# --- keyboard shortcuts and right-drag zoom of the effect (pure functions, tested) ---------------

SHORTCUTS: dict[str, tuple[str, str]] = {
    "i": ("include", "left-clicks add include points"),
    "e": ("exclude", "left-clicks add exclude points"),
    "x": ("box", "left-drags draw a box"),
    "l": ("lasso", "left-drags draw a lasso (Ctrl+drag: an exclude lasso)"),
    "s": ("scribble", "left-drags draw a scribble (Ctrl+drag: an exclude scribble)"),
    "p": ("propagate", "propagate (or re-propagate) the selected segment"),
    "Escape": ("cancel", "cancel the running propagation"),
    "c": ("clear", "clear the selected segment's prompts"),
}
"""Keys (VTK key symbols) in a slice view while the effect is active. Slicer's own slice-view keys
(b, f, g, r, t, v, arrows, brackets) are left alone. ``i`` and ``Escape`` are also keyboard shortcuts
of the Segment Editor itself (``SEGMENT_EDITOR_KEYS``): see docs/slicer.md."""

CLICK_MODES = ("include", "exclude", "box", "lasso", "scribble")
"""What a left press in a slice view does (keys i / e / x / l / s, or the effect's mode buttons)."""

SEGMENT_EDITOR_KEYS = frozenset("0123456789zyqw/*,.<>i") | {"Escape", "space"}
"""Keys the Segment Editor installs as QShortcuts on the main window
(``qMRMLSegmentEditorWidget::installKeyboardShortcuts``): they may never reach a slice view."""


def shortcut_action(key_sym: str, modifiers: bool = False) -> str | None:
    """The effect's action for a key press in a slice view, or None (the key is Slicer's)."""
    if modifiers or key_sym not in SHORTCUTS:
        return None
    return SHORTCUTS[key_sym][0]


def shortcuts_help_html() -> str:
    rows = "".join(f"<b>{'Esc' if key == 'Escape' else key}</b>: {text}; " for key, (_, text) in SHORTCUTS.items())
    return f"Keys in a slice view: {rows.rstrip('; ')}."


def zoomed_field_of_view(start_fov, delta_y: int, window_height: int):
    """The slice view's field of view after a right-drag of ``delta_y`` pixels, as Slicer's
    ``vtkMRMLSliceIntersectionWidget::ProcessZoomSlice`` computes it (None: no valid zoom)."""
    percent = (window_height + delta_y) / (1.0 * max(window_height, 1))
    if percent <= 0:
        return None
    return (start_fov[0] * percent, start_fov[1] * percent, start_fov[2])
