"""Adapter files: the tensors a fine-tuning trained, with what they were trained on top of.

An adapter is a small ``torch.save`` dict: ``{"format": ADAPTER_FORMAT, "metadata": {...},
"state": {parameter name: tensor}}``. The metadata name the base model (registry name and
family) and the sha256 of the base checkpoint file; :func:`apply_adapter` refuses an adapter made
for another base with a :class:`CheckpointError`. Written by :mod:`SAM3DSegmentLib.training`,
loaded by :func:`~SAM3DSegmentLib.models.builders.build_model` (``adapter=``).

3DSAM-adapter adapters (family :data:`SAM3D_ADAPTER_FAMILY`, from ``sam3d finetune --engine
volumetric``) also name the dataset whose intensity handling they were trained with; they are
loaded by :func:`apply_sam3d_adapter` (``open_volumetric_session(adapter=...)``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .registry import ModelSpec

ADAPTER_FORMAT = "sam3d-adapter-1"
SAM3D_ADAPTER_FAMILY = "sam3d_adapter"
"""The ``family`` of adapters trained on a 3DSAM-adapter checkpoint."""


def save_adapter(path: str | Path, state: dict, metadata: dict) -> Path:
    """Write ``state`` (trained tensors, on the CPU) and ``metadata`` to ``path``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_state = {k: v.detach().to("cpu").clone() for k, v in state.items()}
    torch.save({"format": ADAPTER_FORMAT, "metadata": dict(metadata), "state": cpu_state}, path)
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(metadata, state) of an adapter file; CheckpointError when it is not one."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Adapter file {path} does not exist. Give the file `sam3d finetune` wrote.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"Adapter file {path} cannot be read ({type(exc).__name__}); write it again with `sam3d finetune`.") from exc
    if not isinstance(obj, dict) or obj.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path} is not a SAM3DSegment adapter (no '{ADAPTER_FORMAT}' format tag). "
            "Pass a base checkpoint with --checkpoint, an adapter from `sam3d finetune` with --adapter."
        )
    return dict(obj.get("metadata", {})), dict(obj.get("state", {}))


def apply_adapter(model, spec: ModelSpec, adapter_path: str | Path, base_sha256: str | None) -> dict:
    """Load the adapter's tensors into ``model`` (built from the base checkpoint); its metadata.

    ``base_sha256`` is the sha256 of the base checkpoint file the model was loaded from; it must be
    the one the adapter was trained on.
    """
    metadata, state = read_adapter(adapter_path)
    if metadata.get("family") == SAM3D_ADAPTER_FAMILY != spec.family:
        raise CheckpointError(
            f"Adapter {adapter_path} was trained on a 3DSAM-adapter checkpoint, not on {spec.name!r}: "
            "use it with the volumetric engine (open_volumetric_session(..., adapter=FILE))."
        )
    if metadata.get("family") != spec.family or metadata.get("base_model") != spec.name:
        raise CheckpointError(
            f"Adapter {adapter_path} was trained on {metadata.get('base_model')!r} ({metadata.get('family')}), "
            f"not on {spec.name!r}: use --model {metadata.get('base_model')} or an adapter made for {spec.name}."
        )
    if base_sha256 != metadata.get("base_sha256"):
        raise CheckpointError(
            f"Adapter {adapter_path} was trained on the {spec.name} checkpoint with sha256 "
            f"{str(metadata.get('base_sha256'))[:12]}..., but the base checkpoint here has "
            f"{str(base_sha256)[:12]}...: fine-tune again on this checkpoint, or pass the original with --checkpoint."
        )
    _load_fitting(model, state, adapter_path, spec.name)
    return metadata


def apply_sam3d_adapter(model, adapter_path: str | Path, base_sha256: str) -> dict:
    """Load a 3DSAM-adapter adapter's tensors into ``model`` (loaded from the base checkpoint); its metadata.

    ``base_sha256`` is the sha256 of the checkpoint file the model was loaded from: the adapter
    must have been trained on that very file. The model is changed in place.
    """
    metadata, state = read_adapter(adapter_path)
    if metadata.get("family") != SAM3D_ADAPTER_FAMILY:
        raise CheckpointError(
            f"Adapter {adapter_path} was trained on {metadata.get('base_model')!r} ({metadata.get('family')}), "
            "not on a 3DSAM-adapter checkpoint: use it with that model (--model ... --adapter), or train one "
            "for this checkpoint with `sam3d finetune --engine volumetric`."
        )
    if base_sha256 != metadata.get("base_sha256"):
        raise CheckpointError(
            f"Adapter {adapter_path} was trained on the 3DSAM-adapter checkpoint with sha256 "
            f"{str(metadata.get('base_sha256'))[:12]}... ({metadata.get('base_model')}), but the checkpoint here has "
            f"{str(base_sha256)[:12]}...: give the checkpoint it was trained on, or fine-tune again on this one "
            "with `sam3d finetune --engine volumetric --checkpoint FILE`."
        )
    _load_fitting(model, state, adapter_path, str(metadata.get("base_model")))
    return metadata


def _load_fitting(model, state: dict, adapter_path, name: str) -> None:
    """Load ``state`` into ``model`` after checking every tensor has a place of its shape."""
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or tuple(v.shape) != tuple(expected[k].shape)]
    if wrong or not state:
        raise CheckpointError(
            f"Adapter {adapter_path} does not fit model {name}: "
            f"{len(wrong)} tensors unknown or of another shape (e.g. {wrong[0] if wrong else 'none at all'})."
        )
    model.load_state_dict(state, strict=False)
