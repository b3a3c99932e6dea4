"""Adapter files: the tensors a fine-tuning trained, with what they were trained on top of.

An adapter is a small ``torch.save`` dict: ``{"format": ADAPTER_FORMAT, "metadata": {...},
"state": {parameter name: tensor}}``. The metadata name the base model (registry name and
family) and the sha256 of the base checkpoint file; :func:`apply_adapter` refuses an adapter made
for another base with a :class:`CheckpointError`. Written by :mod:`SAM3DSegmentLib.training`,
loaded by :func:`~SAM3DSegmentLib.models.builders.build_model` (``adapter=``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .registry import ModelSpec

ADAPTER_FORMAT = "sam3d-adapter-1"


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
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or tuple(v.shape) != tuple(expected[k].shape)]
    if wrong or not state:
        raise CheckpointError(
            f"Adapter {adapter_path} does not fit model {spec.name}: "
            f"{len(wrong)} tensors unknown or of another shape (e.g. {wrong[0] if wrong else 'none at all'})."
        )
    model.load_state_dict(state, strict=False)
    return metadata
