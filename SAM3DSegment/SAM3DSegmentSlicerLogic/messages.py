"""Short messages for errors, shown to the user instead of tracebacks."""

from __future__ import annotations

from SAM3DSegmentLib.errors import (
    CheckpointError,
    DependencyError,
    DownloadError,
    ModelOutOfMemoryError,
    PropagationCancelled,
    SAM3DError,
)

OUT_OF_MEMORY_ADVICE = (
    "The model ran out of memory. Try: the CPU device, a smaller model (SAM 2.1 tiny, MedSAM2), "
    "a slice range around the object, or cropping the volume (Crop Volume module)."
)


def user_message(error: BaseException) -> str:
    """What to tell the user about ``error`` (the library's errors already carry advice)."""
    if isinstance(error, PropagationCancelled):
        return "Cancelled; the segment was not changed."
    if isinstance(error, ModelOutOfMemoryError):
        return str(error) or OUT_OF_MEMORY_ADVICE
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return OUT_OF_MEMORY_ADVICE
    if isinstance(error, DependencyError):
        return f"{error}\nOpen the SAM 3D module and press 'Install dependencies'."
    if isinstance(error, ImportError):
        return (
            f"A required package is missing ({error}). "
            "Open the SAM 3D module and press 'Install dependencies'."
        )
    if isinstance(error, (CheckpointError, DownloadError)):
        return f"{error}\nDownload the model again in the SAM 3D module, or choose a local checkpoint file."
    if isinstance(error, SAM3DError):
        return str(error)
    return f"Unexpected error: {type(error).__name__}: {error}. Details are in the Python console / log."
