"""Serving: ``sam3d serve`` (sessions in their own process) and its torch-free client.

Holds the wire format shared by server and client (``protocol``: volumes as a JSON header plus
zlib of the raw array, keyed by sha256; masks, prompts, options and results as JSON), the
session core that knows nothing of HTTP (``store``: volumes by hash, sessions per token, undo
history, propagation jobs, leases and idle freeing, one feature-cache budget), the model worker
that runs all model work on one thread taking sessions in turn (``worker``), the FastAPI routes
over the core (``app``), and ``client`` (:class:`~SAM3DSegmentLib.serving.client.RemoteSession`,
the session interface over HTTP with numpy and the standard library only), and nnInteractive's
remote protocol over the same core (``nninteractive`` with its array format in
``nninteractive_arrays``; docs/nninteractive.md), and ``load_bench`` (``sam3d bench --server``:
simulated annotators against one server). Imports ``errors``,
``data`` and ``engines`` (never ``evaluation`` or ``commands``); ``protocol`` and ``client``
must never import torch. See docs/server.md.
"""
