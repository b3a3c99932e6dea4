"""Which engine runs, and why; and opening a session of that engine on a volume.

Engines:

- ``weightfree``: the random walker (:mod:`weightfree`) slice by slice with the sliding-window
  propagation of :mod:`slicewise`. Needs no checkpoint: the offline default and the baseline.
- ``slicewise``: SAM / MedSAM / LiteMedSAM slice by slice (:mod:`sam_slice_predictor`).
- ``sam2``: SAM 2.1 / MedSAM2 with its video memory (:mod:`sam2_video`).
- ``volumetric``: 3DSAM-adapter, one click -> a 3D mask (:mod:`volumetric`); each of its four
  checkpoints is a tumour model for one CT task, so it runs only when asked for (``--engine
  volumetric`` or one of its models by name), never by "auto"'s search.

``choose_engine("auto")`` uses MedSAM2 or MedSAM when the user has their checkpoint, else
LiteMedSAM (installed with the package), and the weight-free engine only when no model can be
used; it says why.
Engine modules are imported only when a session is opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..data.intensity import WindowSpec
from ..data.volume import Volume, check_segmentable
from ..errors import CheckpointError, DependencyError, InputError
from ..models.checkpoint_cache import cache_dir, how_to_get, resolve_checkpoint
from ..models.registry import (
    DEFAULT_MODEL,
    DEFAULT_SAM2_MODEL,
    REGISTRY,
    ModelSpec,
    get_spec,
)

log = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("auto", "weightfree", "slicewise", "sam2", "volumetric")


@dataclass(frozen=True)
class EngineChoice:
    """The engine to run, its model and checkpoint (None for the weight-free engine), and why."""

    engine: str
    spec: ModelSpec | None
    checkpoint_path: Path | None
    reason: str
    adapter: Path | None = None
    """A ``sam3d finetune`` adapter file loaded on top of the checkpoint (None: the base weights)."""


MEDICAL_MODELS = ("medsam2", "medsam_vit_b")
"""Larger medical checkpoints that "auto" prefers to LiteMedSAM when the user has them."""


def auto_preference() -> list[str]:
    """Models "auto" looks for, best first: the larger medical models, LiteMedSAM (installed with
    the package, so normally the end of the search), then the general SAM 2.1 and SAM models.
    Never the 3DSAM-adapter ones: each segments one kind of tumour only."""
    names = [*MEDICAL_MODELS, DEFAULT_MODEL, DEFAULT_SAM2_MODEL]
    names += [n for n, s in REGISTRY.items() if s.family == "sam2" and n not in names]
    names += [n for n, s in REGISTRY.items() if s.family == "sam" and n not in names]
    return names


def choose_engine(
    engine: str = "auto", model: str | None = None, checkpoint: str | Path | None = None, adapter: str | Path | None = None
) -> EngineChoice:
    """The engine for these options; raises a clear error when the request cannot be met."""
    if adapter is not None:  # the base model's choice, with the fine-tuned tensors on top
        base = choose_engine(engine, model, checkpoint)
        if base.spec is None:
            raise InputError("An adapter goes on a model: give --model (e.g. litemedsam) with --adapter.")
        return replace(base, adapter=Path(adapter).expanduser(), reason=f"{base.reason}, with the adapter {adapter}")
    if engine not in ENGINES:
        raise InputError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if engine == "weightfree":
        if model is not None or checkpoint is not None:
            raise InputError("The weight-free engine uses no model; drop --model/--checkpoint or pick another engine.")
        return EngineChoice("weightfree", None, None, "the weight-free engine was requested")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        what = "is a folder" if Path(checkpoint).expanduser().is_dir() else "does not exist"
        where = ""
        named = REGISTRY.get(model) if model else None
        if engine == "volumetric" or (named is not None and named.family == "sam3d_adapter"):
            where = f" The 3DSAM-adapter checkpoints (each a last.pth.tar) are on the authors' page: {_volumetric_page()}"
        raise CheckpointError(f"Checkpoint file {checkpoint} {what}. Give the path of a downloaded .pt/.pth file.{where}")

    spec = _spec_for(model, checkpoint, engine)
    if engine == "auto" and spec is None:
        for name in auto_preference():
            path = cached_checkpoint(get_spec(name))
            if path is not None:
                spec = get_spec(name)
                why = (f"{name} is installed with SAM3DSegment ({path})" if name == DEFAULT_MODEL
                       else f"found the {name} checkpoint ({path})")
                if name != DEFAULT_MODEL and name not in MEDICAL_MODELS:
                    why += f"; {DEFAULT_MODEL} could not be used: {how_to_get(get_spec(DEFAULT_MODEL))}"
                return EngineChoice(_engine_of(spec), spec, path, why)
        return EngineChoice(
            "weightfree", None, None,
            f"no model checkpoint could be used (cache: {cache_dir()}), so the weight-free engine runs. "
            f"{how_to_get(get_spec(DEFAULT_MODEL))}",
        )

    if spec is None and engine == "volumetric":
        raise InputError(
            "The volumetric engine needs --model, the 3DSAM-adapter checkpoint of the task: "
            f"{', '.join(_volumetric_names())} (see `sam3d models list`)."
        )
    if spec is None:  # an explicit SAM engine without a model: its default model
        spec = get_spec(DEFAULT_SAM2_MODEL if engine == "sam2" else DEFAULT_MODEL)
    if engine == "volumetric" and spec.family != "sam3d_adapter":
        raise InputError(
            f"The volumetric engine runs the 3DSAM-adapter models ({', '.join(_volumetric_names())}); "
            f"{spec.name} is a {spec.family} model: use --engine {_engine_of(spec)}."
        )
    if engine in ("slicewise", "sam2") and spec.family == "sam3d_adapter":
        raise InputError(f"{spec.name} is a 3DSAM-adapter model: use --engine volumetric.")
    if engine == "sam2" and spec.family != "sam2":
        raise InputError(f"The sam2 engine needs a SAM 2 model; {spec.name} is a {spec.family} model.")
    if engine == "slicewise" and spec.family == "sam2":
        raise InputError(
            f"The slicewise engine runs SAM / MedSAM / LiteMedSAM models; {spec.name} is a SAM 2 model: use --engine sam2."
        )
    chosen = _engine_of(spec) if engine == "auto" else engine
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        return EngineChoice(chosen, spec, path, f"using {spec.name} from the given checkpoint {path}")
    path = cached_checkpoint(spec)
    if path is not None:
        return EngineChoice(chosen, spec, path, f"using {spec.name} ({path})")
    raise CheckpointError(
        f"Model {spec.name} was asked for, but its checkpoint is not here. {how_to_get(spec)} "
        "Or choose another model (`sam3d models list`), or --engine weightfree."
    )


def cached_checkpoint(spec: ModelSpec) -> Path | None:
    """The checkpoint of ``spec`` in the user cache, or None when it is not there."""
    try:
        path = resolve_checkpoint(spec)
    except CheckpointError as exc:
        if "failed verification" in str(exc):
            log.warning("%s", exc)
        return None
    return Path(path) if Path(path).is_file() else None


def _spec_for(model: str | None, checkpoint: str | Path | None, engine: str = "auto") -> ModelSpec | None:
    if model is not None:
        return get_spec(model)
    if checkpoint is None:
        return None
    name = Path(checkpoint).name
    for spec in REGISTRY.values():
        if spec.filename == name:
            return spec
    fitting = [n for n, s in REGISTRY.items() if engine == "auto" or _engine_of(s) == engine]
    raise InputError(
        f"Cannot tell which model the checkpoint {name} is from its file name; add --model NAME, one of "
        f"{', '.join(fitting)} (see `sam3d models list`)."
    )


def _engine_of(spec: ModelSpec) -> str:
    """The engine that runs a model of this family."""
    if spec.family == "sam3d_adapter":
        return "volumetric"
    return "sam2" if spec.family == "sam2" else "slicewise"  # SAM, MedSAM, LiteMedSAM: slice by slice


def _volumetric_names() -> list[str]:
    return [n for n, s in REGISTRY.items() if s.family == "sam3d_adapter"]


def _volumetric_page() -> str:
    names = _volumetric_names()
    return REGISTRY[names[0]].url if names else ""


def open_session(
    choice: EngineChoice,
    volume: Volume,
    axis: int = 0,
    device: str | None = None,
    window: WindowSpec | None = None,
    **options,
):
    """A :class:`~SAM3DSegmentLib.engines.session.Session` of the chosen engine on ``volume``.

    ``window`` is the intensity window (None: automatic for the modality; the volumetric engine
    uses its checkpoint's own HU range instead). ``options`` go to the engine: for the weight-free
    engine, fields of ``SlicewiseOptions`` and ``RandomWalkerOptions``; the volumetric engine takes
    none (slice-propagation options are ignored there).
    Checks first that the volume can be segmented, the axis exists and a named device is there.
    """
    if not isinstance(volume, Volume):
        raise InputError(f"open_session needs a Volume (see data.volume_files.read_volume); got {type(volume).__name__}.")
    if axis not in (0, 1, 2) or isinstance(axis, bool):
        raise InputError(f"axis must be 0, 1 or 2 (array axes k, j, i); got {axis!r}.")
    check_segmentable(volume)
    if choice.engine == "weightfree":
        if device not in (None, "", "auto"):
            _check_device(device)
        return open_weightfree_session(volume, axis, window, **options)
    if choice.engine == "slicewise":
        try:
            from .sam_slice_predictor import open_sam_session
        except ImportError as exc:
            raise DependencyError(
                f"The slicewise (SAM) engine is not available in this build ({exc}); use --engine weightfree."
            ) from exc
        model = None
        if choice.adapter is not None:
            from ..models.builders import build_model

            model = build_model(choice.spec, choice.checkpoint_path, device, adapter=choice.adapter)
        return open_sam_session(
            volume, axis, model, spec=choice.spec, checkpoint_path=choice.checkpoint_path,
            device=device, window=window, **options,
        )
    if choice.engine == "sam2":
        try:
            from ..models.builders import build_model
            from .sam2_video import Sam2Session
        except ImportError as exc:
            raise DependencyError(
                f"The SAM 2 engine is not available in this build ({exc}); use --engine weightfree."
            ) from exc
        from ..models.devices import select_device

        torch_device = select_device(device)
        model = build_model(choice.spec, choice.checkpoint_path, torch_device, video=True, adapter=choice.adapter)
        return Sam2Session(
            volume, axis, model, choice.spec, window=window or WindowSpec(), device=torch_device, **options
        )
    if choice.engine == "volumetric":
        return open_volumetric(choice, volume, axis, device, window, **options)
    raise InputError(f"Unknown engine {choice.engine!r}; choose one of {', '.join(ENGINES[1:])}.")


def open_volumetric(choice: EngineChoice, volume: Volume, axis: int = 0, device: str | None = None,
                    window: WindowSpec | None = None, model=None, **options):
    """A 3DSAM-adapter session: the model built from the choice's checkpoint, the intensity
    handling of the dataset it was trained on (the registry's ``dataset``), and the choice's
    adapter (from ``sam3d finetune --engine volumetric``) on top, if any. A ``model`` given is
    used as it is (``sam3d serve``'s shared model, which carries its adapter already)."""
    from .slicewise import SlicewiseOptions

    if choice.spec is None or choice.spec.family != "sam3d_adapter":
        raise InputError("The volumetric engine needs a 3DSAM-adapter model (see `sam3d models list`).")
    slice_options = {f.name for f in fields(SlicewiseOptions)}
    unknown = set(options) - slice_options
    if unknown:
        raise InputError(f"Unknown option(s) for the volumetric engine: {', '.join(sorted(unknown))}; it takes none.")
    if options:
        log.info("The volumetric engine propagates in 3D at once; ignoring %s.", ", ".join(sorted(options)))
    if window is not None and window != WindowSpec():
        log.info("The volumetric engine uses its checkpoint's own HU range (%s); the window is not used.",
                 choice.spec.dataset)
    if volume.modality not in (None, "", "CT"):
        log.warning("3DSAM-adapter was trained on CT; this volume is %s.", volume.modality)
    try:
        from ..models.builders import build_model
        from ..models.devices import select_device
        from .volumetric import open_volumetric_session
    except ImportError as exc:
        raise DependencyError(
            f"The volumetric engine is not available in this build ({exc}); use --engine weightfree."
        ) from exc

    torch_device = select_device(device)
    with_adapter = {}
    if model is None:
        model = build_model(choice.spec, choice.checkpoint_path, torch_device)
        if choice.adapter is not None:  # it must have been trained on this very checkpoint file
            from ..models.checkpoint_cache import recorded_sha256, sha256_of

            path = Path(choice.checkpoint_path)
            with_adapter = {"adapter": choice.adapter, "base_sha256": recorded_sha256(path) or sha256_of(path)}
    return open_volumetric_session(volume, model, axis, dataset=choice.spec.dataset, device=torch_device,
                                   **with_adapter)


def _check_device(device) -> None:
    """InputError when a named device is not there; the weight-free engine itself runs on the CPU."""
    from ..models.devices import select_device

    try:
        chosen = select_device(device)
    except ImportError:  # pragma: no cover - builds without torch: the CPU is all there is
        return
    if chosen.type != "cpu":
        log.warning("The weight-free engine runs on the CPU; device %s is not used.", chosen)


def open_weightfree_session(
    volume: Volume, axis: int = 0, window: WindowSpec | None = None, raw_intensities: bool = False, **options
):
    """The weight-free engine: random walker slices with the sliding-window propagation.

    The random walker sees the windowed volume (``window``, automatic by default), or the raw
    intensities when ``raw_intensities``; windowed was better on the real cases (docs/weightfree.md).
    """
    from .slicewise import SlicewiseOptions, SlicewiseSession
    from .weightfree import RandomWalkerOptions, RandomWalkerPredictor

    walker_keys = {f.name for f in fields(RandomWalkerOptions)}
    slicewise_keys = {f.name for f in fields(SlicewiseOptions)}
    unknown = set(options) - walker_keys - slicewise_keys
    if unknown:
        raise InputError(f"Unknown option(s) for the weight-free engine: {', '.join(sorted(unknown))}.")
    walker = RandomWalkerOptions(**{k: v for k, v in options.items() if k in walker_keys})
    slicewise = {k: v for k, v in options.items() if k in slicewise_keys}
    slicewise.setdefault("projection", "mask")
    predictor = RandomWalkerPredictor(volume, axis, None if raw_intensities else (window or WindowSpec()), walker)
    session = SlicewiseSession(volume, axis, predictor, SlicewiseOptions(**slicewise))
    session.engine_name = "weightfree"
    # Measured (docs/results.md): a correction click that starts the random walk afresh beats
    # one that refines the propagated mask, 0.65 vs 0.59 mean Dice after 3 rounds.
    session.refines_propagated_slices = False
    return session
