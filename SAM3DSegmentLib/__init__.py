"""SAM3DSegment library: promptable 3D segmentation with Segment Anything models.

No Slicer and no Qt here. Volumes are numpy arrays in (k, j, i) order with an IJK-to-RAS
matrix; prompts are voxel coordinates on one slice along an array axis; engines open sessions
on volumes. Import submodules directly (they load torch lazily where they can).
"""

__version__ = "0.1.0"
