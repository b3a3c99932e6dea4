"""Dice of the weight-free engine on the real cases in ../shared/data (one click per target).

The click is the deepest pixel (distance transform) of the reference on the slice where the
target is largest, along the K axis. Prints one line per case/target/intensity choice.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weightfree_dice.py [--cases a,b] [--raw]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SAM3DSegmentLib.data.prompts import Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.choice import open_weightfree_session
from SAM3DSegmentLib.engines.session import PropagationOptions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CASES = {
    "ct_upper_abdomen_totalseg": ["kidney_right", "kidney_left"],
    "ct_spleen_msd08": ["spleen"],
    "mr_brain_tumour_pyradiomics": ["tumour"],
    "mr_abdomen_totalseg": ["kidney_left", "spleen"],
    "ct_lesion_000002": ["lesion"],
}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = sitk.ReadImage(str(path))
    spacing = np.array(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * spacing
    return sitk.GetArrayFromImage(image), matrix


def target_mask(label: np.ndarray, case: dict, target: str) -> np.ndarray:
    values = case.get("label_groups", {}).get(target) or [int(v) for v, n in case["labels"].items() if n == target]
    return np.isin(label, values)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--raw", action="store_true", help="also run on raw intensities (no window)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a RandomWalkerOptions / SlicewiseOptions field, e.g. beta=90")
    args = parser.parse_args()
    if not (DATA / "cases.json").is_file():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    cases = {c["case"]: c for c in json.loads((DATA / "cases.json").read_text())}
    options = {}
    for item in args.option:
        key, value = item.split("=", 1)
        options[key] = value if value.isalpha() else float(value)
    scores = {}
    for name in args.cases.split(","):
        case = cases[name]
        array, matrix = load(DATA / name / "image.nii.gz")
        label, _ = load(DATA / name / "label.nii.gz")
        volume = Volume(array.astype(np.float32), matrix, name, "CT" if case["modality"].startswith("CT") else "MR")
        for target in DEFAULT_CASES.get(name, case["targets"][:1]):
            truth = target_mask(label, case, target)
            k = int(np.argmax(truth.sum(axis=(1, 2))))
            depth = ndimage.distance_transform_edt(truth[k])
            row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
            for raw in ([False, True] if args.raw else [False]):
                started = time.perf_counter()
                session = open_weightfree_session(volume, 0, raw_intensities=raw, **options)
                preview = session.add_prompt(1, SlicePrompt(0, k, points=(Point(row, col),)))
                result = session.propagate(1, PropagationOptions())
                value = dice(result.mask, truth)
                slices_truth = int(truth.any(axis=(1, 2)).sum())
                slices_found = len(result.slices_with_object)
                scores.setdefault(raw, []).append(value)
                print(
                    f"{name:30s} {target:14s} {'raw' if raw else 'windowed':8s} Dice {value:.3f}  "
                    f"anchor Dice {dice(preview.mask, truth[k]):.3f}  slices {slices_found}/{slices_truth}  "
                    f"{time.perf_counter() - started:.1f} s", flush=True,
                )
    for raw, values in scores.items():
        print(f"mean Dice ({'raw' if raw else 'windowed'}): {np.mean(values):.3f} over {len(values)} targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
