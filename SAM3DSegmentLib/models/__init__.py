"""Models: which checkpoints exist, where they live, how to build and feed them.

Holds the registry of model specs with each model's input size and normalisation
(``registry``), the user's checkpoint cache and verification (``checkpoint_cache``), downloads
(``download``), reading a checkpoint file and checking its family (``checkpoint_state``),
building the official model objects (``builders``, with YAML configs in ``configs/``), device
choice (``devices``) and SAM 2's input frames (``sam2_frames``). Imports ``errors`` and
``data`` only; never an engine.
"""
