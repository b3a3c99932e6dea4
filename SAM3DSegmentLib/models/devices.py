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
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"Unknown device {preference!r}; use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(
            f"{device} was requested but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them or auto."
        )
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and (mps is None or not mps.is_available()):
        raise InputError("Apple MPS was requested but is not available; use --device cpu or auto.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"Device {preference!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_native_bfloat16() -> bool:
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where bf16 is about twice as fast."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def use_bfloat16(device, precision: str = "auto", cpu_bfloat16: bool = False) -> bool:
    """Whether to run in bfloat16: always on CUDA with "auto" (as SAM 2 recommends); on a CPU
    only where the model's registry entry says it is safe (``cpu_bfloat16``) and the CPU has
    native bf16; "float32" and "bfloat16" force the choice."""
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_bfloat16 and cpu_has_native_bfloat16()


def autocast_context(device, bfloat16: bool | None = None):
    """bfloat16 autocast when ``bfloat16`` (default: on CUDA only), a no-op otherwise."""
    import contextlib

    import torch

    if bfloat16 is None:
        bfloat16 = device.type == "cuda"
    if bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
