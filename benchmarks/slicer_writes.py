"""How much the Slicer logic adds around a propagation, on real MRML (slicer-core).

Prints, for a synthetic CT with several segments: the time to write a one-slice preview into a
segment, to write a whole propagation result, and to find edited slices, each as a ratio of the
weight-free propagation on the same volume (the cheapest engine, so the ratios are upper bounds).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/slicer_writes.py [--shape 48 192 224] [--segments 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SAM3DSegment"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 192, 224), metavar=("K", "J", "I"))
    parser.add_argument("--segments", type=int, default=4, help="segments in the segmentation (one is written)")
    args = parser.parse_args()

    import slicer
    from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation
    from SAM3DSegmentSlicerLogic.session_factory import session_factory_for
    from SAM3DSegmentSlicerLogic.settings import PanelSettings
    from SAM3DSegmentSlicerLogic.volume_nodes import (
        add_volume_node,
        oriented_image_from_mask,
    )

    from SAM3DSegmentLib.data.sample_volume import make_sample
    from SAM3DSegmentLib.engines.session import PropagationOptions

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    sample = make_sample(shape_kji=tuple(args.shape))
    volume_node = add_volume_node(scene, sample.volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = [segmentation.GetSegmentation().AddEmptySegment(f"s{n}") for n in range(args.segments)]
    rng = np.random.default_rng(0)
    for segment_id in ids[1:]:  # other segments with content, so masking and overwrite have work to do
        block = np.zeros(sample.volume.shape, bool)
        k0, j0, i0 = (int(rng.integers(0, n // 2)) for n in sample.volume.shape)
        block[k0:k0 + 10, j0:j0 + 40, i0:i0 + 40] = True
        image = oriented_image_from_mask(block, sample.volume.ijk_to_ras)
        logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent())

    propagation = SegmentPropagation(volume_node, segmentation, session_factory_for(PanelSettings(engine="weightfree", projection="mask")))
    target = ids[0]
    prompt = propagation.point_from_ras(sample.volume.kji_to_ras(sample.click_kji), True, axis=0)

    started = time.perf_counter()
    preview = propagation.preview_in_session(target, prompt)
    preview_model = time.perf_counter() - started
    started = time.perf_counter()
    propagation.write_preview(target, preview)
    preview_write = time.perf_counter() - started

    started = time.perf_counter()
    edits = propagation.edited_slices(target)
    find_edits = time.perf_counter() - started
    started = time.perf_counter()
    result = propagation.propagate_in_session(target, edits, PropagationOptions())
    propagate = time.perf_counter() - started
    started = time.perf_counter()
    report = propagation.write_result(target, result)
    result_write = time.perf_counter() - started

    print(f"volume {sample.volume.shape} (k, j, i), {args.segments} segments; weight-free engine")
    print(f"preview: model {preview_model:.3f} s, write one slice {preview_write:.3f} s "
          f"(write / model = {preview_write / preview_model:.2f})")
    print(f"propagation: {propagate:.2f} s over {len(result.slices_computed)} slices; write {result_write:.3f} s "
          f"({report.changed_voxels} voxels), find edited slices {find_edits:.3f} s")
    print(f"logic overhead / propagation = {(result_write + find_edits) / propagate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
