"""Sessions for the Slicer logic: on a ``sam3d serve`` server in Slicer (see :mod:`.server_process`);
in process only for scripts and benchmarks outside Slicer."""

from __future__ import annotations

import logging
from pathlib import Path

from SAM3DSegmentLib.data.volume import Volume

from .engine_choices import engine_of
from .segment_propagation import SessionFactory
from .server_process import ServerSpec

log = logging.getLogger(__name__)


def remote_session_factory(connection, spec: ServerSpec) -> SessionFactory:
    """A factory opening sessions on ``connection`` (a ``ServerConnection``).

    A local server was started with the settings' engine, model and adapter, so its sessions use its
    defaults; sessions on a remote server ask for the settings' engine and model by name (and get
    the server's adapter when they name the server's model).
    """

    def open_for(volume: Volume, axis: int):
        if spec.remote:
            engine = None if spec.engine == "auto" else spec.engine
            return connection.open_session(volume, axis, engine=engine, model=spec.model or None)
        return connection.open_session(volume, axis)

    where = spec.url if spec.remote else "local server"
    model = f" / {spec.model}" if spec.model else ""
    adapter = f" + adapter {Path(spec.adapter).name}" if spec.adapter else ""
    open_for.reason = f"{spec.engine}{model}{adapter} on {where}"  # type: ignore[attr-defined]
    open_for.engine = engine_of(spec.engine, spec.model)  # type: ignore[attr-defined]  ("auto": known once open)
    return open_for


def session_factory_for(settings) -> SessionFactory:
    """In-process sessions of the engine the settings ask for, for scripts and benchmarks OUTSIDE
    Slicer (e.g. benchmarks/slicer_writes.py). The Slicer effect and self-test never use it: in
    Slicer the model runs in the server process (:func:`remote_session_factory`)."""
    from SAM3DSegmentLib.engines.choice import choose_engine, open_session

    choice = choose_engine(settings.engine, settings.model or None, settings.checkpoint or None,
                           settings.adapter or None)
    log.info("SAM 3D engine (in process): %s (%s)", choice.engine, choice.reason)
    device = None if settings.device == "auto" else settings.device
    options = settings.engine_options(choice.engine)  # none for SAM 2 and the volumetric engine

    def open_for(volume: Volume, axis: int):
        if choice.engine == "weightfree":
            return open_session(choice, volume, axis, **options)
        return open_session(choice, volume, axis, device=device, **options)

    open_for.reason = f"{choice.engine}: {choice.reason}"  # type: ignore[attr-defined]
    open_for.engine = choice.engine  # type: ignore[attr-defined]
    return open_for
