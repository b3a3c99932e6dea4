"""Test doubles shared by several test modules. None of them is a model."""

from SAM3DSegmentLib.data.volume import get_slice
from SAM3DSegmentLib.engines.session import RunsOutput, Session, SliceMask, StopTracker


class ReferenceMaskSession(Session):
    """A test double answering every slice from a reference mask (not a model)."""

    engine_name = "reference-mask"

    def __init__(self, volume, reference, axis=0):
        super().__init__(volume, axis)
        self.reference = reference
        self.encoded = set()

    @property
    def slices_encoded_total(self):
        return len(self.encoded)

    def _predict_anchor(self, object_id, prompt):
        self.encoded.add(prompt.index)
        return SliceMask(get_slice(self.reference, self.axis, prompt.index).copy(), 1.0)

    def _propagate_runs(self, object_id, runs, options, tick):
        masks, reasons = {}, {}
        for run in runs:
            tracker = StopTracker(options.stop)
            for index in run.slices:
                tick(index)
                self.encoded.add(index)
                mask = get_slice(self.reference, self.axis, index).copy()
                masks[index] = SliceMask(mask, 1.0)
                if tracker.update(index, options.stop.absent_reason(mask)):
                    reasons[f"{run.start}{run.step:+d}"] = tracker.reason
                    break
        return RunsOutput(masks, reasons)
