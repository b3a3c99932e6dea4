"""Engines: sessions that turn prompts on anchor slices into a 3D mask.

Holds the session interface every engine follows (``session``: prompts, previews, propagation
options, the stop rule, results), the anchor planning (``anchors``), the feature cache
(``feature_cache``), 3D post-processing (``postprocess``), the sliding-window propagation
(``slicewise``) with its 2D predictors (``sam_slice_predictor`` for SAM / MedSAM, ``weightfree``
for the random walker), SAM 2's memory propagation (``sam2_video``), and the choice of engine
(``choice``: ``choose_engine``, ``open_session``). Imports ``errors``, ``data`` and ``models``.
"""
