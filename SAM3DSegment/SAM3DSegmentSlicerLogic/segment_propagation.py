"""Prompts, preview, propagation and re-propagation of segments, between MRML and a Session.

The model runs in a ``sam3d serve`` process; the session is a ``RemoteSession`` (any object with
the session interface works, e.g. a test double). Everything here runs on Slicer's main thread:
prompts and previews are short requests; a propagation is a job on the server that
:meth:`SegmentPropagation.start_propagation` starts and a :class:`~.propagation_job.PropagationJob`
polls from a timer, writing the result when it is done. ``add_prompt`` and ``propagate`` chain the
steps for scripts, tests and the self-test (``propagate`` waits for the job).

Re-propagation: the segment as last written is remembered per segment. Slices that differ
from it when Propagate is pressed were edited by the user (any Segment Editor tool) and become
anchors through ``Session.set_slice_mask``; the session then recomputes only the runs that
touch changed anchors.

Engines that take include clicks only (the volumetric engine, :mod:`.engine_choices`): a box or an
exclude click is refused with the library's message before it reaches the server (and before it
can change the axis), and other segments never add exclude points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from SAM3DSegmentLib.data.prompts import SlicePrompt
from SAM3DSegmentLib.data.volume import AXIS_NAMES, Volume, get_slice, slice_index_tuple
from SAM3DSegmentLib.engines.session import (
    Preview,
    PropagationOptions,
    PropagationResult,
    Session,
)
from SAM3DSegmentLib.errors import InputError, PromptError

from .masking import MaskingSettings
from .other_segment_prompts import exclude_points, with_exclude_points
from .segment_writer import WriteReport, check_segment, index_extent, other_segments, read_segment, write_segment
from .drawn_prompts import lasso_prompt, scribble_prompt
from .engine_choices import prompt_refusal, takes_include_clicks_only
from .view_prompts import box_prompt, point_prompt, slice_index_of_view
from .volume_nodes import extent_slices, volume_from_node

log = logging.getLogger(__name__)

SessionFactory = Callable[[Volume, int], Session]
"""Opens a session of an engine on a volume along an array axis."""


@dataclass
class SliceEdits:
    """Slices the user changed since the last write: new anchor masks, and emptied slices."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)
    emptied: list[int] = field(default_factory=list)


class SegmentPropagation:
    """SAM 3D on the segments of one segmentation node over one source volume node."""

    def __init__(
        self,
        volume_node,
        segmentation_node,
        session_factory: SessionFactory,
        masking: Callable[[], MaskingSettings] | None = None,
        save_undo_state: Callable[[], None] | None = None,
        exclude_other_segments: Callable[[], bool] | bool = False,
    ):
        self.volume: Volume = volume_from_node(volume_node)
        if segmentation_node is None:
            raise InputError("No segmentation is selected. Create or select a segmentation first.")
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.session_factory = session_factory
        self.masking = masking or MaskingSettings
        self.save_undo_state = save_undo_state
        self.exclude_other_segments = exclude_other_segments
        self.last_exclude_points: list = []  # added to the last prompt (other_segment_prompts.py)
        self.session: Session | None = None
        self.axis: int | None = None
        self._object_ids: dict[str, int] = {}
        self._last_written: dict[str, np.ndarray] = {}
        self.running_job = None  # the PropagationJob in progress, if any

    @property
    def busy(self) -> bool:
        """A propagation runs: prompts, axis changes and other propagations must wait."""
        return self.running_job is not None and not self.running_job.finished

    @property
    def engine(self) -> str:
        """The session's engine once it is open; before, the one the factory declares ("" if unknown)."""
        if self.session is not None:
            return str(getattr(self.session, "engine_name", ""))
        return str(getattr(self.session_factory, "engine", ""))

    def refuse_what_the_engine_cannot_take(self, prompt: SlicePrompt) -> None:
        """PromptError, with the library's message, for a prompt the engine cannot take (e.g. a box or an
        exclude click on the volumetric engine); the session and its prompts stay as they are."""
        refusal = prompt_refusal(self.engine, prompt)
        if refusal is not None:
            raise PromptError(refusal)

    def refuse_while_busy(self, what: str) -> None:
        if self.busy:
            raise PromptError(
                f"A propagation is running: {what} has to wait. Wait for it to finish, or press Cancel."
            )

    # --- sessions and objects ---------------------------------------------------------------

    def use_axis(self, axis: int) -> None:
        """Propagate along ``axis`` from now on; prompts on another axis start a new session
        (never while a propagation runs: that is refused with a message)."""
        if self.axis is not None and axis != self.axis:
            self.refuse_while_busy(f"a prompt in another view ({AXIS_NAMES[axis]})")
            log.info("Prompt along %s: starting a new session (prompts along %s are dropped)",
                     AXIS_NAMES[axis], AXIS_NAMES[self.axis])
            self.close()
        self.axis = axis

    def object_id(self, segment_id: str) -> int:
        return self._object_ids.setdefault(segment_id, len(self._object_ids) + 1)

    def _session(self) -> Session:
        """The session on the current axis, opened on first use (in the worker thread)."""
        if self.axis is None:
            raise PromptError("Click in a slice view first: the prompt sets the propagation axis.")
        if self.session is None:
            self.session = self.session_factory(self.volume, self.axis)
        return self.session

    def anchors(self, segment_id: str) -> dict[int, SlicePrompt]:
        if self.session is None or self.object_id(segment_id) not in self.session.object_ids:
            return {}
        return self.session.anchors(self.object_id(segment_id))

    def clear_prompts(self, segment_id: str) -> None:
        """Forget every prompt of the segment (its voxels stay)."""
        self.refuse_while_busy("clearing the prompts")
        if self.session is not None:
            self.session.remove_object(self.object_id(segment_id))
        self._last_written.pop(segment_id, None)

    def close(self) -> None:
        """Close the session (a running propagation is cancelled first; a dead server is ignored)."""
        if self.busy:
            self.running_job.abandon()
        self.running_job = None
        if self.session is not None:
            self.session.close()
        self.session = None
        self._last_written.clear()

    # --- prompts (main thread builds them; worker computes the preview) ---------------------

    # A prompt is built (and checked: inside the volume, large enough) before the axis changes,
    # so a rejected click never drops the session's prompts.

    def point_from_ras(self, ras, positive: bool, axis: int) -> SlicePrompt:
        prompt = point_prompt(self.volume, axis, ras, positive)
        self.refuse_what_the_engine_cannot_take(prompt)
        self.use_axis(axis)
        return prompt

    def box_from_ras(self, corner0_ras, corner1_ras, axis: int) -> SlicePrompt:
        prompt = box_prompt(self.volume, axis, corner0_ras, corner1_ras)
        self.refuse_what_the_engine_cannot_take(prompt)
        self.use_axis(axis)
        return prompt

    def lasso_from_ras(self, segment_id: str, contour_ras, axis: int, slice_to_ras, positive: bool = True) -> SlicePrompt:
        """A lasso drawn in a view (RAS contour) as a mask prompt on the slice the view shows:
        the filled polygon (include), or the segment on that slice minus the polygon (exclude).
        Add it with ``add_prompt(..., replace=True)``: the slice becomes exactly that mask."""
        index = slice_index_of_view(self.volume, axis, slice_to_ras)
        current = None
        if not positive:
            check_segment(self.segmentation_node, segment_id)
            current = get_slice(read_segment(self.segmentation_node, segment_id, self.volume), axis, index).copy()
        prompt = lasso_prompt(self.volume, axis, index, contour_ras, positive, current)
        self.use_axis(axis)
        return prompt

    def scribble_from_ras(self, stroke_ras, axis: int, slice_to_ras, positive: bool = True) -> SlicePrompt:
        """A scribble drawn in a view as include (exclude) points sampled along it, on the view's slice."""
        index = slice_index_of_view(self.volume, axis, slice_to_ras)
        prompt = scribble_prompt(self.volume, axis, index, stroke_ras, positive)
        self.refuse_what_the_engine_cannot_take(prompt)
        self.use_axis(axis)
        return prompt

    def prompt_from_segment(self, segment_id: str, axis: int, index: int) -> SlicePrompt:
        """"Use the current segment on this slice as the prompt": a mask prompt from the segment."""
        check_segment(self.segmentation_node, segment_id)
        if not 0 <= index < self.volume.shape[axis]:
            raise PromptError(f"Slice {index} is outside the volume along {AXIS_NAMES[axis]}.")
        mask = get_slice(read_segment(self.segmentation_node, segment_id, self.volume), axis, index).copy()
        if not mask.any():
            raise PromptError(
                f"Segment is empty on slice {index}. Paint it on this slice first, or click on the object."
            )
        self.use_axis(axis)
        return SlicePrompt(axis=axis, index=index, mask=mask)

    def preview_in_session(self, segment_id: str, prompt: SlicePrompt, replace: bool = False) -> Preview:
        """Add the prompt to the session and compute its 2D mask (one short request to the server).
        ``replace``: the prompt replaces the slice's earlier prompts instead of being merged with them."""
        self.refuse_while_busy("a new prompt")
        return self._session().add_prompt(self.object_id(segment_id), prompt, replace_existing=replace)

    def write_preview(self, segment_id: str, preview: Preview) -> WriteReport:
        """Show the preview in the segment on its slice (an undo state first)."""
        mask = np.zeros(self.volume.shape, dtype=bool)
        within = slice_index_tuple(preview.axis, preview.index)
        mask[within] = preview.mask
        return self._write(segment_id, mask, within)

    def excluding_other_segments(self, segment_id: str, prompt: SlicePrompt) -> SlicePrompt:
        """With the setting "Other segments are exclude prompts" on: the prompt plus exclude points
        inside the other visible segments near it, on the prompt's slice only
        (:mod:`.other_segment_prompts`). ``last_exclude_points`` holds what was added."""
        enabled = self.exclude_other_segments
        self.last_exclude_points = []
        if not (enabled() if callable(enabled) else enabled) or prompt.mask is not None:
            return prompt
        if takes_include_clicks_only(self.engine):
            log.info("The %s engine takes include clicks only: other segments add no exclude points.", self.engine)
            return prompt
        extent = index_extent(slice_index_tuple(prompt.axis, prompt.index), self.volume.shape)
        layers = other_segments(self.segmentation_node, segment_id, self.volume, extent)
        others = [get_slice(layer.mask, prompt.axis, 0) for layer in layers.values() if layer.visible]
        others = [mask for mask in others if mask.any()]
        pixel_mm = np.delete(self.volume.spacing_kji, prompt.axis)
        self.last_exclude_points = exclude_points(prompt, others, pixel_mm)
        if self.last_exclude_points:
            log.info("Exclude points inside other segments on slice %d: %s", prompt.index,
                     [(p.row, p.col) for p in self.last_exclude_points])
        return with_exclude_points(prompt, self.last_exclude_points)

    def add_prompt(self, segment_id: str, prompt: SlicePrompt, replace: bool = False) -> Preview:
        """Prompt, preview, write the preview slice (``replace``: see :meth:`preview_in_session`).
        Other visible segments become exclude points on the slice when the setting says so."""
        check_segment(self.segmentation_node, segment_id)
        self.refuse_what_the_engine_cannot_take(prompt)
        self.use_axis(prompt.axis)
        self.refuse_while_busy("a new prompt")
        self._session()  # open, so that its engine is known (a remote server's "auto")
        self.refuse_what_the_engine_cannot_take(prompt)
        prompt = self.excluding_other_segments(segment_id, prompt)
        preview = self.preview_in_session(segment_id, prompt, replace)
        self.write_preview(segment_id, preview)
        return preview

    # --- propagation ------------------------------------------------------------------------

    def edited_slices(self, segment_id: str) -> SliceEdits:
        """Slices along the axis where the segment differs from what was last written."""
        check_segment(self.segmentation_node, segment_id)
        edits = SliceEdits()
        last = self._last_written.get(segment_id)
        if last is None or self.axis is None:
            return edits
        current = read_segment(self.segmentation_node, segment_id, self.volume)
        other = tuple(a for a in range(3) if a != self.axis)
        for index in np.flatnonzero((current != last).any(axis=other)):
            mask = get_slice(current, self.axis, int(index)).copy()
            if mask.any():
                edits.masks[int(index)] = mask
            else:
                edits.emptied.append(int(index))
        return edits

    def _prepare_propagation(self, segment_id: str, edits: SliceEdits):
        """Edited slices become anchors; (session, object id) ready to propagate."""
        self.refuse_while_busy("another propagation")
        session = self._session()
        object_id = self.object_id(segment_id)
        for index, mask in sorted(edits.masks.items()):
            session.set_slice_mask(object_id, index, mask)
        for index in edits.emptied:
            if object_id in session.object_ids and index in session.anchors(object_id):
                session.remove_anchor(object_id, index)
        if object_id not in session.object_ids:
            raise PromptError(
                "This segment has no SAM 3D prompts yet: click on the object in a slice view, drag a box, "
                "or use the current segment on a slice as the prompt."
            )
        return session, object_id

    def propagate_in_session(
        self,
        segment_id: str,
        edits: SliceEdits,
        options: PropagationOptions,
        progress=None,
        cancel=None,
    ) -> PropagationResult:
        """Make edited slices anchors, then propagate and wait (only affected runs); writes nothing."""
        session, object_id = self._prepare_propagation(segment_id, edits)
        return session.propagate(object_id, options, progress, cancel)

    def start_propagation(self, segment_id: str, options: PropagationOptions | None = None):
        """Start a propagation job on the server (edited slices become anchors first) and return
        its :class:`~.propagation_job.PropagationJob`; poll that from a timer. Nothing is written
        until the job is done."""
        from .propagation_job import PropagationJob

        edits = self.edited_slices(segment_id)
        session, object_id = self._prepare_propagation(segment_id, edits)
        status = session.start_propagation(object_id, options or PropagationOptions())
        self.running_job = PropagationJob(self, segment_id, session, status, edits)
        return self.running_job

    def write_result(self, segment_id: str, result: PropagationResult) -> WriteReport:
        """Write a finished propagation into the segment (an undo state first).

        Slices the user edited while the propagation ran are kept as the user left them (and
        still count as edited, so they become anchors next time).
        """
        mask = result.mask
        kept: dict[int, np.ndarray] = {}
        edits = self.edited_slices(segment_id)
        edited = {**edits.masks, **{i: None for i in edits.emptied}}
        if edited and result.axis == self.axis:
            current = read_segment(self.segmentation_node, segment_id, self.volume)
            last = self._last_written[segment_id]
            for index in edited:
                if not np.array_equal(get_slice(current, self.axis, index), get_slice(mask, self.axis, index)):
                    if mask is result.mask:
                        mask = mask.copy()
                    get_slice(mask, self.axis, index)[...] = get_slice(current, self.axis, index)
                    kept[index] = get_slice(last, self.axis, index).copy()
        report = self._write(segment_id, mask, None)
        last = self._last_written[segment_id]
        for index, previous in kept.items():
            get_slice(last, self.axis, index)[...] = previous
        if kept:
            log.info("Kept slices edited during the propagation: %s", sorted(kept))
        report.kept_slices = sorted(kept)
        return report

    def propagate(
        self, segment_id: str, options: PropagationOptions | None = None, progress=None, cancel=None
    ) -> tuple[PropagationResult, WriteReport]:
        """Edits -> anchors, propagate, write (blocking: scripts and tests). Cancel or failure writes nothing."""
        edits = self.edited_slices(segment_id)
        result = self.propagate_in_session(segment_id, edits, options or PropagationOptions(), progress, cancel)
        return result, self.write_result(segment_id, result)

    def _write(self, segment_id: str, mask: np.ndarray, within) -> WriteReport:
        report = write_segment(
            self.segmentation_node, segment_id, mask, self.volume,
            masking=self.masking(), save_undo_state=self.save_undo_state, within=within,
        )
        last = self._last_written.get(segment_id)
        if last is None:
            last = read_segment(self.segmentation_node, segment_id, self.volume)
        else:
            last[extent_slices(report.examined_extent)] = report.examined_after
        self._last_written[segment_id] = last
        return report
