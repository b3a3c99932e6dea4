"""Exceptions with messages that tell the user what to do."""


class SAM3DError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(SAM3DError, ValueError):
    """An input volume, label map or file cannot be used as given."""


class PromptError(SAM3DError, ValueError):
    """A prompt is invalid for the volume it is applied to."""


class CheckpointError(SAM3DError):
    """A model checkpoint is missing, corrupt, or of the wrong family."""


class DownloadError(SAM3DError):
    """A checkpoint download failed (network, size or checksum)."""


class DependencyError(SAM3DError, ImportError):
    """An optional dependency (torch, segment-anything, sam2, ...) is missing."""


class ModelOutOfMemoryError(SAM3DError, MemoryError):
    """The device ran out of memory; the message says what to try instead."""


class PropagationCancelled(SAM3DError):
    """The user cancelled a propagation; nothing was changed."""


class ServerError(SAM3DError):
    """A segmentation server could not be reached, refused the request, or stopped mid-request."""
