"""Intensity windowing, once per volume, to the 8-bit range the models were trained on.

CT uses a window in Hounsfield units (presets or the user's / Slicer's display window); MR and
unknown modalities use percentiles of the whole volume. Never per slice: a per-slice min-max
makes the same tissue look different on every slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

CT_PRESETS: dict[str, tuple[float, float]] = {
    # name: (width, level) in HU
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "liver": (150.0, 30.0),
}


@dataclass(frozen=True)
class WindowSpec:
    """How to map intensities to 0..255.

    ``mode`` is "window" (``width``/``level`` in the volume's units), "percentile"
    (``lower``/``upper`` percentiles of the volume), or "auto" (CT: soft-tissue window;
    otherwise 0.5-99.5 percentiles).
    """

    mode: str = "auto"
    width: float | None = None
    level: float | None = None
    lower: float = 0.5
    upper: float = 99.5

    @classmethod
    def preset(cls, name: str) -> "WindowSpec":
        if name not in CT_PRESETS:
            raise InputError(f"Unknown CT window preset {name!r}; choose one of {sorted(CT_PRESETS)}.")
        width, level = CT_PRESETS[name]
        return cls(mode="window", width=width, level=level)

    @classmethod
    def window(cls, width: float, level: float) -> "WindowSpec":
        if width <= 0:
            raise InputError(f"Window width must be positive; got {width}.")
        return cls(mode="window", width=float(width), level=float(level))

    @classmethod
    def percentiles(cls, lower: float = 0.5, upper: float = 99.5) -> "WindowSpec":
        if not 0 <= lower < upper <= 100:
            raise InputError(f"Percentiles must satisfy 0 <= lower < upper <= 100; got {lower}, {upper}.")
        return cls(mode="percentile", lower=float(lower), upper=float(upper))

    def resolved(self, modality: str | None) -> "WindowSpec":
        """The concrete window for a volume of this modality ("auto" decided here)."""
        if self.mode != "auto":
            return self
        if modality is not None and modality.upper().startswith("CT"):
            return WindowSpec.preset("soft_tissue")
        return WindowSpec.percentiles(self.lower, self.upper)


def intensity_bounds(array: np.ndarray, spec: WindowSpec) -> tuple[float, float]:
    """(low, high) intensities that map to 0 and 255."""
    if spec.mode == "window":
        if spec.width is None or spec.level is None or spec.width <= 0:
            raise InputError("A window needs a positive width and a level.")
        return spec.level - spec.width / 2.0, spec.level + spec.width / 2.0
    if spec.mode == "percentile":
        sample = array if array.size <= 8_000_000 else array.ravel()[:: array.size // 8_000_000 + 1]
        low, high = np.percentile(sample, [spec.lower, spec.upper])
        return float(low), float(high)
    raise InputError(f"Unknown window mode {spec.mode!r}; use 'window', 'percentile' or 'auto'.")


def window_volume(array: np.ndarray, spec: WindowSpec, modality: str | None = None) -> np.ndarray:
    """The whole volume mapped to uint8 with one window (same shape as ``array``)."""
    low, high = intensity_bounds(array, spec.resolved(modality))
    if high <= low:
        high = low + 1.0
    scaled = (array.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
