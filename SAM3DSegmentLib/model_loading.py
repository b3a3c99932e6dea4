"""Build the official model objects and load checkpoints in each family's official format.

* SAM / MedSAM ("sam"): ``segment_anything.sam_model_registry[builder]``; the checkpoint is a
  plain state dict.
* SAM 2.1 / MedSAM2 ("sam2"): ``sam2.build_sam.build_sam2`` with the hydra config shipped in the
  sam2 package, or the same construction from our own YAML in ``SAM3DSegmentLib/configs``
  (MedSAM2 at 512 px); the checkpoint is ``{"model": state_dict}``.

``checkpoint_path=None`` gives a randomly initialised model (tests and speed benchmarks).
We do the ``torch.load`` ourselves (``weights_only=True``) so that corrupt, truncated and
wrong-family files raise :class:`CheckpointError` with advice, then load the weights strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .errors import CheckpointError, DependencyError, InputError
from .registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

FAMILY_NAMES = {"sam": "SAM (segment-anything, incl. MedSAM)", "sam2": "SAM 2 (incl. SAM 2.1, MedSAM2)"}

# The overrides sam2.build_sam applies for image use (build_sam2) ...
_SAM2_IMAGE_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
# ... and for video use (build_sam2_video_predictor).
_SAM2_VIDEO_OVERRIDES = (
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    *_SAM2_IMAGE_OVERRIDES,
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)


def build_model(
    spec: ModelSpec | str,
    checkpoint_path: str | Path | None = None,
    device=None,
    *,
    video: bool = False,
    overrides: Sequence[str] = (),
):
    """The official model for ``spec``, in eval mode on ``device`` (a torch device or name).

    Returns a segment-anything ``Sam`` (family "sam") or a sam2 ``SAM2Base`` (family "sam2";
    with ``video=True`` the ``SAM2VideoPredictor`` subclass, configured like
    ``sam2.build_sam.build_sam2_video_predictor``). ``checkpoint_path=None`` means random
    initialisation.

    ``overrides`` are hydra-style config overrides for sam2 models (e.g.
    ``["++model.image_size=256"]``). They are TEST-ONLY: they make small random models for fast
    tests and must not be used with real checkpoints.
    """
    from .devices import select_device

    spec = get_spec(spec)
    torch_device = select_device(device) if not _is_torch_device(device) else device
    state = None
    if checkpoint_path is not None:
        state = load_checkpoint_state(checkpoint_path, expected_family=spec.family, model_name=spec.name)
    if spec.family == "sam":
        if video or overrides:
            raise InputError(f"Model '{spec.name}' is a SAM model: video mode and config overrides apply to SAM 2 only.")
        model = _build_sam(spec)
    elif spec.family == "sam2":
        model = _build_sam2(spec, video=video, overrides=overrides)
    else:  # pragma: no cover - registry entries are typed
        raise InputError(f"Model '{spec.name}' has unknown family {spec.family!r}.")
    if state is not None:
        _load_state_strict(model, state, spec, checkpoint_path)
    model = model.to(torch_device)
    model.eval()
    return model


def _is_torch_device(device) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(device, torch.device)


def _build_sam(spec: ModelSpec):
    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        raise DependencyError(
            "The segment-anything package is needed for SAM/MedSAM models: pip install segment-anything"
        ) from exc
    if spec.builder not in sam_model_registry:
        raise InputError(f"segment-anything has no builder {spec.builder!r} (model '{spec.name}').")
    return sam_model_registry[spec.builder](checkpoint=None)


def _build_sam2(spec: ModelSpec, video: bool, overrides: Sequence[str]):
    try:
        import sam2  # noqa: F401  (initialises hydra with sam2's config module)
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise DependencyError(
            "The sam2 package is needed for SAM 2 / MedSAM2 models: "
            "SAM2_BUILD_CUDA=0 pip install sam2"
        ) from exc
    extra = list(_SAM2_VIDEO_OVERRIDES if video else _SAM2_IMAGE_OVERRIDES) + list(overrides)
    if spec.config_source == "sam2":
        # The official builder path: hydra compose of the config shipped in the sam2 package.
        from hydra import compose

        cfg = compose(config_name=spec.builder, overrides=extra)
    else:
        path = CONFIG_DIR / spec.builder
        if not path.is_file():
            raise InputError(f"Config {path} for model '{spec.name}' is missing; reinstall SAM3DSegment.")
        cfg = OmegaConf.load(path)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item.lstrip("+") for item in extra]))
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def checkpoint_family(state: dict) -> str | None:
    """"sam", "sam2" or None, from the parameter names of a state dict."""
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith(("memory_attention.", "memory_encoder.", "sam_mask_decoder.")) for k in keys):
        return "sam2"
    if any(k.startswith("mask_decoder.") for k in keys) and any(k.startswith("image_encoder.") for k in keys):
        return "sam"
    return None


def load_checkpoint_state(
    path: str | Path, expected_family: str | None = None, model_name: str = "", mmap: bool = False
) -> dict:
    """The state dict in checkpoint ``path``; CheckpointError if missing, corrupt or of the wrong family.

    SAM files are plain state dicts; SAM 2 files are ``{"model": state_dict, ...}``.
    """
    import torch

    path = Path(path)
    fix = _advice(model_name)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist. {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty. {fix}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # Old (non-zip) checkpoints cannot be memory-mapped: read them normally.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(
            f"Checkpoint file {path} cannot be read: it is corrupt, truncated or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {fix}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj, dict):
        state = obj
    else:
        raise CheckpointError(f"Checkpoint file {path} holds a {type(obj).__name__}, not a state dict. {fix}")
    found = checkpoint_family(state)
    if found is None:
        raise CheckpointError(
            f"Checkpoint file {path} is neither a SAM nor a SAM 2 checkpoint (unrecognised parameter names). {fix}"
        )
    if expected_family is not None and found != expected_family:
        raise CheckpointError(
            f"Checkpoint file {path} is a {FAMILY_NAMES[found]} checkpoint, but model "
            f"'{model_name or expected_family}' is a {FAMILY_NAMES[expected_family]} model. "
            f"Pick a {FAMILY_NAMES[found]} model (see `sam3d models list`) or pass a matching checkpoint."
        )
    return state


def _load_state_strict(model, state: dict, spec: ModelSpec, path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in lines[:4])
        raise CheckpointError(
            f"Checkpoint {path} does not fit model '{spec.name}' ({spec.builder}): {detail}. "
            "It is probably another size of the same family (e.g. ViT-L weights for ViT-B); "
            "choose the matching --model."
        ) from exc


def _advice(model_name: str) -> str:
    if model_name:
        return (f"Download it again with `sam3d models download {model_name}`, "
                "or pass a valid file with --checkpoint FILE.")
    return "Pass a valid checkpoint file with --checkpoint FILE."


def resolve_checkpoint(spec_or_name: ModelSpec | str, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint file to use: the user's ``checkpoint`` if given, else the verified cache file.

    The cache file counts as verified when its size and sha256 match the registry (where known).
    The sha256 is recorded beside the file at download time, so it is recomputed only for a
    file copied into the cache by hand, once.
    """
    from . import download

    spec = get_spec(spec_or_name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} does not exist; check the path given with --checkpoint.")
        return path
    path = download.cached_path(spec)
    if path.is_file():
        report = download.verify(spec, path, checksum=True, load=False)
        if report.ok:
            return path
        raise CheckpointError(
            f"The cached checkpoint {path} for '{spec.name}' failed verification ({'; '.join(report.problems)}). "
            f"Run `sam3d models download {spec.name}` to fetch it again, or pass --checkpoint FILE."
        )
    if not spec.direct_download:
        raise CheckpointError(
            f"No checkpoint for model '{spec.name}' in the cache. Its publisher shares it at {spec.url}: "
            f"download {spec.filename} there, then pass --checkpoint FILE or copy it to {path}."
        )
    raise CheckpointError(
        f"No checkpoint for model '{spec.name}' in the cache ({path.parent}). "
        f"Run `sam3d models download {spec.name}`, or pass a local file with --checkpoint FILE."
    )
