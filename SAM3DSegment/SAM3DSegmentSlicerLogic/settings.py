"""The module panel's settings, kept with the scene in a parameter node (string parameters)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from SAM3DSegmentLib.engines.anchors import Direction
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule
from SAM3DSegmentLib.errors import InputError

from .engine_choices import VOLUMETRIC, engine_of

DIRECTIONS: tuple[str, ...] = ("both", "forward", "backward")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
PREFIX = "SAM3D."


@dataclass
class PanelSettings:
    """Engine, model, device, propagation options (-1 in a slice limit means "volume edge"), and the
    server: empty ``server_url`` starts a local ``sam3d serve`` (with ``adapter``, a fine-tuned adapter
    file, when set); otherwise the URL of a running server and the file holding its token (the token
    itself is never stored in the scene; a remote server's adapter is its own setting)."""

    engine: str = "auto"
    model: str = ""
    checkpoint: str = ""
    device: str = "auto"
    direction: Direction = "both"
    first_slice: int = -1
    last_slice: int = -1
    min_area: int = 10
    min_score: float = 0.5
    patience: int = 2
    projection: str = "box"
    exclude_other_segments: bool = True
    server_url: str = ""
    server_token_file: str = ""
    adapter: str = ""

    def propagation_options(self, n_slices: int) -> PropagationOptions:
        """The library's options; slice limits of -1 mean the volume's first / last slice."""
        if self.direction not in DIRECTIONS:
            raise InputError(f"Direction must be one of {', '.join(DIRECTIONS)}; got {self.direction!r}.")
        first = 0 if self.first_slice < 0 else self.first_slice
        last = n_slices - 1 if self.last_slice < 0 else self.last_slice
        if not 0 <= first <= last < n_slices:
            raise InputError(
                f"Slice range {first}..{last} is not inside the volume's 0..{n_slices - 1}. "
                "Fix the first/last slice (or set them to -1 for the whole volume)."
            )
        slice_range = None if (first, last) == (0, n_slices - 1) else (first, last)
        stop = StopRule(min_area=self.min_area, min_score=self.min_score if self.min_score > 0 else None,
                        patience=self.patience)
        return PropagationOptions(direction=self.direction, slice_range=slice_range, stop=stop)

    def engine_options(self, engine: str | None = None) -> dict:
        """Options passed to the engine factory: the projection mode of sliding-window engines; none for
        SAM 2 nor the volumetric engine (which propagates in 3D at once). ``engine``: the engine chosen
        for these settings (default: the settings' own)."""
        engine = engine or engine_of(self.engine, self.model)
        return {} if engine in ("sam2", VOLUMETRIC) else {"projection": self.projection}

    @property
    def uses_remote_server(self) -> bool:
        return bool(self.server_url.strip())


def save_settings(settings: PanelSettings, node) -> None:
    """Store ``settings`` as parameters of a ``vtkMRMLScriptedModuleNode``."""
    was_modifying = node.StartModify()
    try:
        for f in fields(settings):
            node.SetParameter(PREFIX + f.name, str(getattr(settings, f.name)))
    finally:
        node.EndModify(was_modifying)


def load_settings(node) -> PanelSettings:
    """Settings from a parameter node; missing or unreadable values keep their defaults."""
    settings = PanelSettings()
    if node is None:
        return settings
    for f in fields(settings):
        text = node.GetParameter(PREFIX + f.name)
        if not text:
            continue
        default = getattr(settings, f.name)
        if isinstance(default, bool):  # saved as "True" / "False"; bool("False") would be True
            if text in ("True", "False", "1", "0"):
                setattr(settings, f.name, text in ("True", "1"))
            continue
        try:
            value = type(default)(text)
        except ValueError:
            continue
        setattr(settings, f.name, value)
    return settings
