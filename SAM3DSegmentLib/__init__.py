"""SAM3DSegment library: promptable 3D segmentation with Segment Anything models.

No Slicer and no Qt here. One subpackage per layer, each importing only the layers below it
(a test reads every import to keep it so):

``errors`` (the exception types) < ``data`` (volumes, files, windowing, prompts) < ``models``
(registry, checkpoints, downloads, devices, model input) < ``engines`` (the session interface
and the engines) < ``training`` (fine-tuning on the user's labels) < ``evaluation`` (metrics,
simulated users, datasets, benchmarks) <
``serving`` (``sam3d serve`` and its torch-free client) < ``commands`` (the ``sam3d`` command
line).

Volumes are numpy arrays in (k, j, i) order with an IJK-to-RAS matrix; prompts are voxel
coordinates on one slice along an array axis; engines open sessions on volumes. Import the
modules directly (they load torch lazily where they can). See docs/architecture.md.
"""

__version__ = "0.1.0"
