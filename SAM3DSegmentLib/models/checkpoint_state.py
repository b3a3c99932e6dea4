"""Read a checkpoint file into a state dict, tell its family, and load it strictly into a model.

SAM / MedSAM files are plain state dicts; SAM 2.1 / MedSAM2 files are ``{"model": state_dict}``;
3DSAM-adapter files are the authors' training dict (``encoder_dict``, ``decoder_dict``,
``feature_dict`` and their optimiser states), returned whole. We do the ``torch.load``
ourselves (``weights_only=True``) so that corrupt, truncated and wrong-family files raise
:class:`CheckpointError` with advice.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .registry import REGISTRY, ModelSpec

FAMILY_NAMES = {
    "sam": "SAM (segment-anything, incl. MedSAM)",
    "sam2": "SAM 2 (incl. SAM 2.1, MedSAM2)",
    "litemedsam": "LiteMedSAM (TinyViT encoder)",
    "sam3d_adapter": "3DSAM-adapter (volumetric engine)",
}
FAMILY_ENGINES = {"sam": "slicewise", "litemedsam": "slicewise", "sam2": "sam2", "sam3d_adapter": "volumetric"}
"""The engine that runs each family (``--engine``)."""
SAM3D_ADAPTER_PARTS = ("encoder_dict", "decoder_dict", "feature_dict")
"""The entries of a 3DSAM-adapter checkpoint in the authors' layout (their train.py)."""
SAM_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
"""SAM image encoder width (``image_encoder.patch_embed.proj.weight``'s first size) by builder."""


def checkpoint_family(state: dict) -> str | None:
    """"sam", "sam2", "litemedsam", "sam3d_adapter" or None, from the parameter names of a state dict."""
    keys = [k for k in state if isinstance(k, str)]
    if all(isinstance(state.get(part), (dict, list)) for part in SAM3D_ADAPTER_PARTS):
        return "sam3d_adapter"
    if any(k.startswith(("memory_attention.", "memory_encoder.", "sam_mask_decoder.")) for k in keys):
        return "sam2"
    if any(k.startswith("mask_decoder.") for k in keys) and any(k.startswith("image_encoder.") for k in keys):
        tiny_vit = any(k.startswith(("image_encoder.patch_embed.seq.", "image_encoder.layers.")) for k in keys)
        return "litemedsam" if tiny_vit else "sam"
    return None


def load_checkpoint_state(
    path: str | Path, expected_family: str | None = None, model_name: str = "", mmap: bool = False
) -> dict:
    """The state dict in checkpoint ``path``; CheckpointError if missing, corrupt or of the wrong family.

    SAM files are plain state dicts; SAM 2 files are ``{"model": state_dict, ...}``; a
    3DSAM-adapter file is returned whole (its ``encoder_dict``, ``decoder_dict``, ``feature_dict``).
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
            f"Checkpoint file {path} is not a SAM, SAM 2 or LiteMedSAM checkpoint, nor a 3DSAM-adapter one "
            f"(unrecognised parameter names). {fix}"
        )
    if expected_family is not None and found != expected_family:
        raise CheckpointError(
            f"Checkpoint file {path} is a {FAMILY_NAMES[found]} checkpoint, but model "
            f"'{model_name or expected_family}' is a {FAMILY_NAMES[expected_family]} model. "
            f"Pick a {FAMILY_NAMES[found]} model with --engine {FAMILY_ENGINES[found]} "
            "(see `sam3d models list`) or pass a matching checkpoint."
        )
    return state


def load_state_strict(model, state: dict, spec: ModelSpec, path) -> None:
    """Load ``state`` into ``model`` strictly; a short CheckpointError naming the likely mix-up otherwise."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    detail = "; ".join(
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
        if keys
    )
    if not detail:
        try:
            model.load_state_dict(state, strict=True)
            return
        except RuntimeError as exc:  # e.g. a dtype the model cannot take
            detail = str(exc).strip().splitlines()[0][:200]
    raise CheckpointError(
        f"Checkpoint {path} does not fit model '{spec.name}' ({spec.builder}): parameters {detail}. "
        f"{_size_hint(state, spec)}"
    )


def _size_hint(state: dict, spec: ModelSpec) -> str:
    """Which models a SAM checkpoint's encoder width fits, else general advice."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    builder = SAM_VIT_WIDTHS.get(int(weight.shape[0])) if hasattr(weight, "shape") and weight.ndim == 4 else None
    names = [n for n, s in REGISTRY.items() if s.family == spec.family and s.builder == builder]
    if names:
        return f"Its encoder is a ViT-{builder[-1].upper()}: use --model {' or '.join(names)}."
    return "It is probably another size of the same family; choose the matching --model (see `sam3d models list`)."


def _advice(model_name: str) -> str:
    spec = REGISTRY.get(model_name)
    if spec is not None and not spec.direct_download and not spec.package_requirement:
        return f"Download it again by hand from {spec.url}, or pass a valid file with --checkpoint FILE."
    if model_name:
        return (f"Download it again with `sam3d models download {model_name}`, "
                "or pass a valid file with --checkpoint FILE.")
    return "Pass a valid checkpoint file with --checkpoint FILE."
