"""The CVPR 2025 challenge's files, and our datasets as the challenge's images.

A challenge case is ``<name>.npz`` with ``imgs`` (D, H, W), ``spacing`` (mm, in the array's axis
order), optionally ``boxes`` (one dict per class, in ascending label order; see
:class:`~SAM3DSegmentLib.evaluation.cvpr25.ChallengeBox`) and, for training cases, ``gts``.
Validation and test references ship as ``<name>.npz`` holding only ``gts`` in a separate folder
(``--gts``). The output per case (:func:`~SAM3DSegmentLib.evaluation.cvpr25.write_challenge_output`) is
``<name>.npz`` with ``segs`` (the final label map) and ``all_segs`` (the label map after each step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.volume import Volume
from ..errors import InputError
from .correction_rounds import user_seed
from .cvpr25 import ChallengeBox, ChallengeImage, ChallengeTarget, challenge_box, write_challenge_output  # noqa: F401
from .datasets import Case, case_targets, load_case, target_mask

log = logging.getLogger(__name__)


def is_challenge_folder(path: str | Path) -> bool:
    """A folder of ``.npz`` cases without a ``cases.json``."""
    path = Path(path)
    return path.is_dir() and not (path / "cases.json").is_file() and any(path.glob("*.npz"))


def _load(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=True) as data:
            return dict(data)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read {path} as a challenge .npz: {exc}") from None


def challenge_volume(imgs: np.ndarray, spacing, name: str = "") -> Volume:
    """A volume of the challenge's (D, H, W) array; ``spacing`` is in the same axis order.

    Its intensities are already normalised (0-255), so no modality window is applied."""
    spacing = [float(s) for s in np.asarray(spacing, dtype=np.float64).ravel()]
    if np.asarray(imgs).ndim != 3 or len(spacing) != 3:
        raise InputError(f"{name}: expected 3D imgs and 3 spacings; got {np.asarray(imgs).shape} and {spacing}.")
    ijk_to_ras = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(np.asarray(imgs), ijk_to_ras, name=name, modality=None)


def read_challenge_case(path: str | Path, gts_folder: str | Path | None = None, axis: int = 0) -> ChallengeImage:
    """One challenge ``.npz`` with its reference (from ``gts_folder`` if given, else its own ``gts``)."""
    path = Path(path)
    data = _load(path)
    for key in ("imgs", "spacing"):
        if key not in data:
            raise InputError(f"{path} has no '{key}'; a challenge case holds imgs, spacing and optionally boxes.")
    if gts_folder is not None:
        reference_path = Path(gts_folder) / path.name
        if not reference_path.is_file():
            raise InputError(f"No reference {reference_path} for {path.name}; --gts must hold one .npz per case.")
        gts = _load(reference_path).get("gts")
    else:
        gts = data.get("gts")
    if gts is None:
        raise InputError(f"No 'gts' for {path.name}: give --gts FOLDER with the references.")
    gts = np.asarray(gts)
    if gts.shape != np.asarray(data["imgs"]).shape:
        raise InputError(f"{path.name}: gts shape {gts.shape} differs from imgs shape {np.asarray(data['imgs']).shape}.")
    values = [int(v) for v in np.unique(gts) if v != 0]
    boxes = [ChallengeBox.from_dict(dict(b)) for b in data["boxes"]] if "boxes" in data else None
    if boxes is not None and axis != 0:
        raise InputError("The challenge's boxes lie on slices along array axis 0; use --axis 0.")
    if boxes is not None and len(boxes) != len(values):
        raise InputError(f"{path.name}: {len(boxes)} boxes for {len(values)} classes.")
    targets = [ChallengeTarget(f"label_{v}", v, gts == v, boxes[n] if boxes else None) for n, v in enumerate(values)]
    return ChallengeImage(path.stem, path.parent.name, path.stem.split("_")[0],
                          challenge_volume(data["imgs"], data["spacing"], path.stem), targets)


def read_challenge_folder(folder: str | Path, gts_folder: str | Path | None = None, names: list[str] | None = None,
                          axis: int = 0) -> Iterator[ChallengeImage]:
    """The folder's cases in name order (one at a time: they are large)."""
    paths = sorted(Path(folder).glob("*.npz"))
    if names:
        known = {p.stem for p in paths}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"Unknown case(s) {', '.join(unknown)} in {folder}.")
        paths = [p for p in paths if p.stem in names]
    for path in paths:
        yield read_challenge_case(path, gts_folder, axis)


def images_from_cases(cases: list[Case], targets: list[str] | None = None, axis: int = 0,
                      seed: int = 0) -> Iterator[ChallengeImage]:
    """Our cases as challenge images: label values 1..n in target order, boxes made as the
    challenge's ``get_boxes.py`` makes them (its 0-5 px growth seeded per case and target)."""
    for case in cases:
        volume, label = load_case(case)
        chosen = []
        for name in case_targets(case, label, targets):
            reference = target_mask(case, label, name)
            if not reference.any():
                log.warning("%s: target %s is empty; skipped", case.name, name)
                continue
            rng = np.random.RandomState(user_seed(seed, case.name, name))
            chosen.append(ChallengeTarget(name, len(chosen) + 1, reference, challenge_box(reference, axis, rng)))
        if chosen:
            yield ChallengeImage(case.name, case.dataset, case.modality or "", volume, chosen)


def write_challenge_case(path: str | Path, imgs: np.ndarray, spacing, gts: np.ndarray | None = None,
                         boxes: list[ChallengeBox] | None = None) -> Path:
    """A case in the challenge's input format (for tests and conversions)."""
    arrays: dict = {"imgs": np.asarray(imgs), "spacing": np.asarray(spacing, dtype=np.float64)}
    if gts is not None:
        arrays["gts"] = np.asarray(gts)
    if boxes is not None:
        arrays["boxes"] = np.array([b.to_dict() for b in boxes], dtype=object)
    np.savez_compressed(path, **arrays)
    return Path(path)
