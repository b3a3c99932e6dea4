"""Fine-tuning a model on the user's own volumes and corrected labels (``sam3d finetune``).

``slices`` turns (volume, label) pairs into training slices: the frozen image encoder's
embedding of every slice that holds the target, computed once with the exact preprocessing of
:mod:`~SAM3DSegmentLib.engines.sam_slice_predictor` (kept in memory, optionally cached on disk),
with the label in the model's low-res frame and its box. ``finetune`` trains the mask decoder
(optionally the prompt encoder) with the base weights frozen, with a validation split, early
stopping and resumable checkpoints, and writes a small adapter file
(:mod:`~SAM3DSegmentLib.models.adapters`) that ``build_model(adapter=...)`` loads.
``volumetric_finetune`` trains a 3DSAM-adapter checkpoint's adapters, click encoder and 3D
decoder (SAM's ViT frozen, the authors' rule) on crops around each target, prepared as the
volumetric engine prepares a volume; its adapter is loaded by
``open_volumetric_session(adapter=...)``. ``epochs`` holds the epoch loop both share (best
epoch, early stop, time limit, progress, resumable checkpoints).

This layer sits between ``engines`` and ``evaluation``: it may import ``errors``, ``data``,
``models`` and ``engines``, never ``evaluation``, ``serving`` or ``commands``.
"""
