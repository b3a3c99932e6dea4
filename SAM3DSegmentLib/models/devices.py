"""Device choice: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

import logging

from ..errors import InputError

log = logging.getLogger(__name__)


def select_device(preference=None):
    """A ``torch.device`` for ``preference`` ("auto"/None, "cuda", "cuda:1", "mps", "cpu", or a torch.device)."""
    import torch

    if isinstance(preference, torch.device):
        return preference
    if preference in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise InputError(f"Unknown device {preference!r}; use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("Apple MPS was requested but is not available; use --device cpu or auto.")
    return device


def autocast_context(device):
    """bfloat16 autocast on CUDA (as SAM 2 recommends), a no-op elsewhere."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
