"""Data: what a volume and a prompt are, and how they get in and out of files.

Holds the :class:`~SAM3DSegmentLib.data.volume.Volume` ((k, j, i) array + IJK-to-RAS) and slice
access along an axis (``volume``), reading volumes and label maps and writing label maps and
Slicer segmentations (``volume_files``), intensity windowing once per volume (``intensity``),
typed prompts and the one conversion to SAM's (x, y) order (``prompts``), and the synthetic
sample volume (``sample_volume``). Knows nothing of models: imports only ``errors``, numpy,
scipy, SimpleITK and slicerio.
"""
