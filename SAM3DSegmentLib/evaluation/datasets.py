"""Evaluation datasets: the ``cases.json`` format, or a folder of image/label pairs.

``cases.json`` (as in ``../shared/data``) is a list of cases, each with ``case`` (the folder
holding ``image.nii.gz`` and ``label.nii.gz``), ``modality``, ``labels`` (value -> structure
name), ``label_groups`` (name -> list of values, e.g. ``whole_tumour``), ``targets`` (structures
complete along the slice axis), ``source_repository`` and ``reference``.

A folder of pairs is either sub-folders each holding ``image.*`` and ``label.*``, or
``imagesTr``/``labelsTr`` (Medical Segmentation Decathlon / nnU-Net layout, ``_0000`` channel
suffixes allowed). Its targets are the label values present, named ``label_<value>``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.volume import Volume
from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class Case:
    """One image with its label map and the structures to evaluate on it."""

    name: str
    image_path: Path
    label_path: Path
    modality: str | None = None
    labels: dict[int, str] = field(default_factory=dict)
    label_groups: dict[str, list[int]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    dataset: str = ""
    reference: str = ""

    def target_values(self, target: str) -> list[int]:
        """Label values making up ``target`` (a structure name, a group, or ``label_<value>``)."""
        if target in self.label_groups:
            return [int(v) for v in self.label_groups[target]]
        for value, name in self.labels.items():
            if name == target:
                return [int(value)]
        match = re.fullmatch(r"label_(\d+)", target)
        if match:
            return [int(match.group(1))]
        known = sorted(set(self.labels.values()) | set(self.label_groups))
        raise InputError(f"Case {self.name} has no structure '{target}'. Known: {', '.join(known)}.")


def load_case(case: Case) -> tuple[Volume, np.ndarray]:
    """The case's volume and label map (which must lie on the image's grid), read by :mod:`~SAM3DSegmentLib.data.volume_files`."""
    from ..data.volume_files import read_label_map, read_volume

    volume = read_volume(case.image_path, modality=case.modality)
    volume.name = case.name
    return volume, np.asarray(read_label_map(case.label_path, volume))


def target_mask(case: Case, label: np.ndarray, target: str) -> np.ndarray:
    """Boolean mask of ``target`` in the label map."""
    return np.isin(label, case.target_values(target))


def read_cases_json(path: str | Path) -> list[Case]:
    """The cases listed in a ``cases.json`` (or the one inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "cases.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found; give a cases.json or a folder of image/label pairs.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    cases = []
    for entry in entries:
        folder = path.parent / entry["case"]
        repository = entry.get("source_repository", "")
        cases.append(Case(
            name=entry["case"],
            image_path=folder / "image.nii.gz",
            label_path=folder / "label.nii.gz",
            modality=entry.get("modality"),
            labels={int(k): v for k, v in entry.get("labels", {}).items()},
            label_groups={k: [int(v) for v in vs] for k, vs in entry.get("label_groups", {}).items()},
            targets=list(entry.get("targets", [])),
            dataset=entry.get("dataset") or repository.split("/")[-1] or entry["case"],
            reference=entry.get("reference", ""),
        ))
    return cases


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_folder_of_pairs(folder: str | Path, modality: str | None = None) -> list[Case]:
    """Cases from sub-folders with ``image.*``/``label.*``, or from ``imagesTr``/``labelsTr``."""
    folder = Path(folder)
    pairs: list[tuple[str, Path, Path]] = []
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        for label_path in sorted((folder / "labelsTr").iterdir()):
            stem = _strip_suffix(label_path.name)
            image = _find_image(folder / "imagesTr", stem) or _find_image(folder / "imagesTr", f"{stem}_0000")
            if image is not None and not label_path.name.startswith("."):
                pairs.append((stem, image, label_path))
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            image, label = _find_image(sub, "image"), _find_image(sub, "label")
            if image is not None and label is not None:
                pairs.append((sub.name, image, label))
    if not pairs:
        raise InputError(
            f"No image/label pairs found in {folder}: expected sub-folders with image.nii.gz and "
            "label.nii.gz, or imagesTr/ and labelsTr/ folders, or a cases.json."
        )
    cases = []
    for name, image, label in pairs:
        cases.append(Case(name=name, image_path=image, label_path=label, modality=modality,
                          dataset=folder.name))
    return cases


def open_dataset(path: str | Path, modality: str | None = None) -> list[Case]:
    """Cases from a ``cases.json`` (file or folder holding one) or a folder of pairs."""
    path = Path(path)
    if path.is_file() or (path / "cases.json").is_file():
        return read_cases_json(path)
    if not path.is_dir():
        raise InputError(f"Dataset {path} does not exist.")
    return read_folder_of_pairs(path, modality)


def case_targets(case: Case, label: np.ndarray, wanted: list[str] | None = None) -> list[str]:
    """The targets to evaluate: ``wanted`` (those the case has), else the case's own targets,
    else every label value present (``label_<value>`` unless named)."""
    if case.targets:
        available = list(case.targets)
    else:
        values = [int(v) for v in np.unique(label) if v != 0]
        available = [case.labels.get(v, f"label_{v}") for v in values]
    if not wanted:
        return available
    names = set(available) | set(case.labels.values()) | set(case.label_groups)
    return [t for t in wanted if t in names or re.fullmatch(r"label_\d+", t)]


def select_cases(cases: list[Case], names: list[str] | None) -> list[Case]:
    """The named cases (all when ``names`` is empty); unknown names are an error."""
    if not names:
        return cases
    by_name = {c.name: c for c in cases}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(f"Unknown case(s) {', '.join(unknown)}. Known: {', '.join(by_name)}.")
    return [by_name[n] for n in names]
