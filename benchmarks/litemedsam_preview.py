"""Click-to-preview latency of LiteMedSAM on an encoded slice, per kind of prompt.

The slice is the target's largest; it is encoded once, then each prompt goes through the session
(``add_prompt``, as a click in Slicer does) ``--repeats`` times and the median is printed:

- a box (decoder only);
- an include click inside the slice's current mask (a confirmation: decoder only);
- an include click on a part the mask misses (the weight-free region for the box, then the decoder).

    OMP_NUM_THREADS=2 python benchmarks/litemedsam_preview.py --case ct_upper_abdomen_totalseg --target kidney_left
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.engines.choice import choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.evaluation.datasets import load_case, open_dataset, select_cases, target_mask  # noqa: E402


def median_ms(session, prompt: SlicePrompt, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        session.remove_object(1)
        session.add_prompt(1, SlicePrompt(prompt.axis, prompt.index, mask=prompt.mask))  # the slice's current mask
        started = time.perf_counter()
        session.add_prompt(1, SlicePrompt(prompt.axis, prompt.index, points=prompt.points, box=prompt.box))
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--case", default="ct_upper_abdomen_totalseg")
    parser.add_argument("--target", default="kidney_left")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()

    case = select_cases(open_dataset(args.data), [args.case])[0]
    volume, label = load_case(case)
    reference = target_mask(case, label, args.target)
    k = int(np.argmax(reference.sum(axis=(1, 2))))
    truth = reference[k]
    session = open_session(choose_engine("slicewise"), volume, 0)
    rows, cols = np.nonzero(truth)
    box = Box(float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max()))
    mask = session.add_prompt(1, SlicePrompt(0, k, box=box)).mask  # encodes the slice
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=3))
    left_part = mask & (np.arange(mask.shape[1])[None, :] < np.median(cols))
    missed = np.argwhere(truth & ~left_part)
    prompts = {
        "box (decoder only)": SlicePrompt(0, k, box=box, mask=mask),
        "include click inside the mask": SlicePrompt(0, k, points=(Point(*map(float, inside[len(inside) // 2])),), mask=mask),
        "include click on a missed part": SlicePrompt(0, k, points=(Point(*map(float, missed[len(missed) // 2])),),
                                                      mask=left_part),
    }
    print(f"{args.case} / {args.target}, slice {k} ({truth.shape[0]} x {truth.shape[1]} px), "
          f"median of {args.repeats}")
    for name, prompt in prompts.items():
        print(f"  {name}: {median_ms(session, prompt, args.repeats):.0f} ms")


if __name__ == "__main__":
    main()
