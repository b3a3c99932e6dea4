"""A PNG montage of slices with a mask (and optionally a reference) overlaid, with Pillow.

Slices are shown as stored (rows and columns as in :mod:`volume`: along axis 0, rows are J and
columns are I), windowed once for the whole volume; the mask is a translucent red fill, the
reference a green outline. Pixels are stretched to the in-plane spacing so shapes look right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data.intensity import WindowSpec, window_volume
from ..data.volume import Volume, get_slice
from ..errors import InputError

MASK_RGB = (255, 40, 40)
REFERENCE_RGB = (40, 220, 40)


def pick_slices(mask: np.ndarray, axis: int, count: int, reference: np.ndarray | None = None) -> list[int]:
    """Up to ``count`` evenly spread slices where the mask (or the reference) is present;
    evenly spread over the volume when both are empty."""
    other = tuple(a for a in range(3) if a != axis)
    present = mask.any(axis=other)
    if reference is not None:
        present |= reference.any(axis=other)
    candidates = np.flatnonzero(present)
    if candidates.size == 0:
        candidates = np.arange(mask.shape[axis])
    if candidates.size <= count:
        return [int(c) for c in candidates]
    positions = np.linspace(0, candidates.size - 1, count).round().astype(int)
    return [int(candidates[p]) for p in positions]


def montage_image(
    volume: Volume,
    mask: np.ndarray,
    axis: int = 0,
    slices: list[int] | None = None,
    reference: np.ndarray | None = None,
    window: WindowSpec | None = None,
    max_tiles: int = 12,
    columns: int = 4,
    tile_size: int = 192,
):
    """A ``PIL.Image`` of the chosen slices with the overlays and the slice numbers."""
    from PIL import Image, ImageDraw

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise InputError(f"Mask shape {mask.shape} differs from the volume's {volume.shape}.")
    if reference is not None and np.asarray(reference).shape != volume.shape:
        raise InputError(f"Reference shape {np.asarray(reference).shape} differs from the volume's {volume.shape}.")
    image = window_volume(volume.array, window or WindowSpec(), volume.modality)
    slices = slices if slices is not None else pick_slices(mask, axis, max_tiles, reference)
    spacing = np.delete(volume.spacing_kji, axis)  # (row, col) mm
    tiles = []
    for index in slices:
        gray = get_slice(image, axis, index).astype(np.float32)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        m = get_slice(mask, axis, index)
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(MASK_RGB, dtype=np.float32)
        if reference is not None:
            ref = np.asarray(get_slice(reference, axis, index), dtype=bool)
            outline = ref & ~ndimage.binary_erosion(ref)
            rgb[outline] = REFERENCE_RGB
        tile = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        height_mm, width_mm = gray.shape[0] * spacing[0], gray.shape[1] * spacing[1]
        scale = tile_size / max(height_mm, width_mm)
        tile = tile.resize((max(1, round(width_mm * scale)), max(1, round(height_mm * scale))), Image.NEAREST)
        ImageDraw.Draw(tile).text((4, 2), f"slice {index}", fill=(255, 255, 0))
        tiles.append(tile)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (0, 0, 0))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % columns) * cell_w, (n // columns) * cell_h))
    return sheet


def save_montage(path: str | Path, volume: Volume, mask: np.ndarray, **kwargs) -> Path:
    """Write :func:`montage_image` as a PNG at ``path`` (folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    montage_image(volume, mask, **kwargs).save(path, format="PNG")
    return path
