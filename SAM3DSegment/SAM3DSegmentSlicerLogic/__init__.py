"""The SAM 3D Slicer logic: MRML <-> library, without Qt (tested on real MRML with slicer-core).

- :mod:`.volume_nodes`: volume node -> library ``Volume``; labelmaps <-> numpy.
- :mod:`.view_prompts`: RAS clicks / boxes in a slice view -> ``SlicePrompt`` on the best-aligned axis.
- :mod:`.drawn_prompts`: lasso contours -> mask prompts, scribble strokes -> sampled points.
- :mod:`.other_segment_prompts`: exclude points inside other visible segments near a prompt ("Other segments are exclude prompts").
- :mod:`.masking`: the Segment Editor's editable area, intensity range and overwrite settings.
- :mod:`.segment_writer`: writing a mask into one segment (undo state first, changed extent only).
- :mod:`.segment_propagation`: prompts, preview, propagate, re-propagate after edits.
- :mod:`.server_process`: the ``sam3d serve`` process (started with Slicer's Python) or a server URL.
- :mod:`.propagation_job`: a propagation job on the server, polled from a timer; writes when done.
- :mod:`.session_factory`: sessions on the server for the panel's settings.
- :mod:`.markers`: prompt markers in markups nodes of our own (hidden, not the active place list).
- :mod:`.settings`: the panel's settings kept in a parameter node.
- :mod:`.engine_choices`: the engine list, the volumetric engine's models and the prompts it refuses.
- :mod:`.dependencies`: which Python packages are missing and how to install them.
- :mod:`.messages`: user-facing messages for errors.
"""
