"""What 5 clicks could reach under the CVPR 2025 protocol from an engine's own box step.

Reads the ``all_segs`` a ``sam3d eval --protocol cvpr25`` run wrote per case, starts from each
class's mask after the box, and replays the challenge's 5 clicks (the centre of the largest 3D
error component) with idealised answers instead of a model's:

- ``part``: the click fixes the 2D part of its error component on its own slice;
- ``slice``: the click fixes every error on its own slice;
- ``slice+-N``: the click fixes every error on its slice and on the N slices either side.

The mean final DSC over classes of each, next to the run's own, bounds what an engine that
corrects only the clicked slice (or its neighbours too) could gain from its box.

    python benchmarks/cvpr25_click_bounds.py --run DIR --data ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SAM3DSegmentLib.data.volume import get_slice  # noqa: E402
from SAM3DSegmentLib.evaluation.cvpr25 import N_CLICKS, class_dice, error_click  # noqa: E402
from SAM3DSegmentLib.evaluation.cvpr25_files import images_from_cases  # noqa: E402
from SAM3DSegmentLib.evaluation.datasets import open_dataset, select_cases  # noqa: E402


def fixed_region(prediction: np.ndarray, reference: np.ndarray, click, axis: int, answer: str) -> np.ndarray:
    """The voxels an idealised answer to ``click`` sets right."""
    error = prediction != reference
    index = click.kji[axis]
    region = np.zeros(error.shape, dtype=bool)
    if answer == "part":
        labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
        component = labels == labels[click.kji]
        parts, _ = ndimage.label(get_slice(component, axis, index))
        pixel = tuple(v for a, v in enumerate(click.kji) if a != axis)
        get_slice(region, axis, index)[...] = parts == parts[pixel]
        return region
    reach = 0 if answer == "slice" else int(answer.split("+-")[1])
    for k in range(max(0, index - reach), min(error.shape[axis], index + reach + 1)):
        get_slice(region, axis, k)[...] = get_slice(error, axis, k)
    return region


def replay(start: np.ndarray, reference: np.ndarray, axis: int, answer: str) -> float:
    """Final DSC after the challenge's clicks, each answered as ``answer`` says."""
    prediction = start.copy()
    for _ in range(N_CLICKS):
        click = error_click(prediction, reference)
        if click is None:
            break
        region = fixed_region(prediction, reference, click, axis, answer)
        prediction[region] = reference[region]
    return class_dice(reference, prediction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the --out folder of a sam3d eval --protocol cvpr25 run (one engine)")
    parser.add_argument("--data", required=True, help="the dataset folder the run used")
    parser.add_argument("--cases", nargs="*", help="case names (default: every case the run wrote)")
    parser.add_argument("--axis", type=int, default=0)
    args = parser.parse_args(argv)
    run = Path(args.run)
    names = args.cases or sorted(p.stem for p in run.glob("*.npz"))
    answers = ("part", "slice", "slice+-1", "slice+-2")
    rows = []
    print(f"| case | target | box | run | {' | '.join(answers)} |\n|---|---|---|---|{'---|' * len(answers)}")
    for image in images_from_cases(select_cases(open_dataset(args.data), names), axis=args.axis):
        steps = np.load(run / f"{image.name}.npz")["all_segs"]
        for target in image.targets:
            reference = np.asarray(target.reference, dtype=bool)
            start, final = steps[0] == target.value, steps[-1] == target.value
            row = [class_dice(reference, start), class_dice(reference, final)]
            row += [replay(start, reference, args.axis, answer) for answer in answers]
            rows.append(row)
            print(f"| {image.name} | {target.name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    means = np.mean(rows, axis=0)
    print(f"| mean of {len(rows)} | | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
