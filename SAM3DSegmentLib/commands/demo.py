"""``sam3d demo``: segment a synthetic lesion from one click, offline, and check it against the truth.

Makes the sample volume (:mod:`~SAM3DSegmentLib.data.sample_volume`), clicks the lesion's centre, propagates with the
best available engine (the weight-free engine when no checkpoint is cached), and writes the
image, the segmentation (.seg.nrrd) and a PNG montage into ``--out``; prints the Dice against
the known truth and which engine ran and why.
"""

from __future__ import annotations

import time
from pathlib import Path

from .segment import (
    ProgressBar,
    add_engine_arguments,
    parse_window,
    print_summary,
    propagate,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="segment a synthetic lesion from one click (offline) and report Dice",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--out", default="sam3d_demo", metavar="DIR", help="output folder (default: sam3d_demo)")
    add_engine_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


def run(args) -> int:
    import SimpleITK as sitk

    from ..data import volume_files
    from ..data.prompts import prompt_from_voxels
    from ..data.sample_volume import make_sample
    from ..engines.choice import choose_engine, open_session
    from ..evaluation.metrics import dice
    from ..evaluation.montage import save_montage

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    window = parse_window(args.window)
    choice = choose_engine(args.engine, args.model, args.checkpoint, args.adapter)
    sample = make_sample()
    volume = sample.volume
    k, j, i = sample.click_kji
    print(f"sample: synthetic CT {volume.shape[::-1]} voxels (i, j, k), spacing "
          f"{tuple(round(float(s), 2) for s in volume.spacing_kji[::-1])} mm; one click on the "
          f"{sample.structure} at IJK {i},{j},{k}")
    print(f"engine: {choice.engine} ({choice.reason})")

    image_path = out / "sample_image.nrrd"
    sitk.WriteImage(volume_files.image_from_array(volume.array, volume.ijk_to_ras), str(image_path), useCompression=True)
    volume_files.write_label_map(sample.truth, volume, out / "sample_truth.nrrd")

    started = time.perf_counter()
    prompt = prompt_from_voxels(0, positive_kji=[sample.click_kji])
    session = open_session(choice, volume, 0, device=args.device, window=window)
    try:
        result = propagate(session, prompt, progress=None if args.no_progress else ProgressBar())
    finally:
        session.close()
    seconds = time.perf_counter() - started

    segmentation = volume_files.write_segmentation({1: result.mask}, volume, out / "sample_segmentation.seg.nrrd",
                                         names={1: sample.structure})
    montage = save_montage(out / "sample_montage.png", volume, result.mask, reference=sample.truth, window=window)
    print_summary(result, volume, seconds)
    print(f"Dice against the known truth: {dice(result.mask, sample.truth):.3f}")
    print(f"wrote {image_path}\nwrote {segmentation}\nwrote {montage} (red: result, green outline: truth)")
    return 0
