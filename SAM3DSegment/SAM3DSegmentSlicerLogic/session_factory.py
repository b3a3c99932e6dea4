"""The session factory of the panel's settings, through the library's engine choice."""

from __future__ import annotations

import logging

from SAM3DSegmentLib.data.volume import Volume

from .segment_propagation import SessionFactory
from .settings import PanelSettings

log = logging.getLogger(__name__)


def session_factory_for(settings: PanelSettings) -> SessionFactory:
    """A factory opening sessions of the engine the settings ask for ("auto" picks one and says why)."""
    from SAM3DSegmentLib.engines.choice import choose_engine, open_session

    choice = choose_engine(settings.engine, settings.model or None, settings.checkpoint or None)
    log.info("SAM 3D engine: %s (%s)", choice.engine, choice.reason)
    device = None if settings.device == "auto" else settings.device
    options = settings.engine_options() if choice.engine != "sam2" else {}

    def open_for(volume: Volume, axis: int):
        if choice.engine == "weightfree":
            return open_session(choice, volume, axis, **options)
        return open_session(choice, volume, axis, device=device, **options)

    open_for.reason = f"{choice.engine}: {choice.reason}"  # type: ignore[attr-defined]
    return open_for
