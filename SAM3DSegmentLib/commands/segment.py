"""``sam3d segment``: prompt one slice of a volume and propagate through it.

Coordinates: ``--point``, ``--negative`` and ``--box`` take IJK voxel indices ``i,j,k`` by
default, as Slicer shows them (i = column, j = row, k = slice of an axial scan; zero-based).
With ``--ras`` they are RAS millimetres ``r,a,s`` (Slicer's world coordinates). All points and
the box must lie on one slice along ``--axis``.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, PromptError
from .progress import TextProgress

AXES = {"k": 0, "j": 1, "i": 2, "0": 0, "1": 1, "2": 2}
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment one structure from clicks / a box / a mask on one slice",
        description=(
            "Prompt one slice and propagate through the volume. Coordinates are IJK voxel indices "
            "i,j,k (zero-based, as in Slicer's data probe) unless --ras is given, then RAS mm r,a,s."
        ),
    )
    parser.add_argument("image", help="image file (.nii.gz, .nrrd, .mha, ...) or DICOM series folder")
    parser.add_argument("--point", action="append", default=[], metavar="I,J,K",
                        help="include click (repeatable)")
    parser.add_argument("--negative", action="append", default=[], metavar="I,J,K",
                        help="exclude click (repeatable)")
    parser.add_argument("--box", metavar="I0,J0,K0,I1,J1,K1", help="box by two opposite corners on one slice")
    parser.add_argument("--mask", metavar="FILE",
                        help="label map on the image grid (non-zero = object); its largest slice is the "
                             "prompt, or the clicked slice when clicks are given")
    parser.add_argument("--ras", action="store_true", help="coordinates are RAS millimetres, not IJK indices")
    parser.add_argument("--out", required=True, metavar="SEG", help="output: .seg.nrrd, .nii.gz, .nii or .nrrd")
    add_engine_arguments(parser)
    parser.add_argument("--server", metavar="URL",
                        help="segment on a `sam3d serve` server (the URL it printed) instead of in this process")
    parser.add_argument("--token-file", metavar="FILE", help="the server's token file (with --server)")
    parser.add_argument("--axis", default="k", choices=sorted(AXES),
                        help="propagation axis: k (default; axial for axial scans), j or i; the digits "
                             "0, 1, 2 are array axes, so 0 = k, 1 = j, 2 = i (not the order of I,J,K)")
    parser.add_argument("--direction", default="both", choices=("both", "forward", "backward"),
                        help="forward = increasing slice index")
    parser.add_argument("--slice-range", metavar="FIRST,LAST", help="inclusive slice range to fill")
    parser.add_argument("--keep", default="prompted", choices=("prompted", "largest", "none"),
                        help="keep the 3D component touching the prompt (default), the largest, or all")
    parser.add_argument("--component", type=int, metavar="N",
                        help="for a 4D or multi-component image: which volume / component to segment")
    parser.add_argument("--name", default="Segment_1", help="segment name in a .seg.nrrd")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    accept_negative_coordinates(parser)
    parser.set_defaults(run=run)


def accept_negative_coordinates(parser: argparse.ArgumentParser) -> None:
    """Let ``--point -12.5,30,4`` (RAS) parse: argparse takes only plain negative numbers as values,
    not comma lists (``--point=-12.5,30,4`` always works)."""
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d+)*$")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine, --model, --checkpoint, --adapter, --device, --window (shared with ``sam3d demo``)."""
    parser.add_argument("--engine", default="auto", choices=("auto", "weightfree", "slicewise", "sam2", "volumetric"),
                        help="auto: MedSAM2 / MedSAM / LiteMedSAM / SAM 2.1 / SAM, whichever checkpoint is here "
                             "first, else weight-free; volumetric: 3DSAM-adapter (one click -> a 3D tumour mask; "
                             "give --model 3dsam_adapter_kits, _lits, _pancreas or _colon), never chosen by auto")
    parser.add_argument("--model", help="registry model name (see `sam3d models list`)")
    parser.add_argument("--checkpoint", metavar="FILE", help="local checkpoint file instead of the cache")
    parser.add_argument("--adapter", metavar="FILE",
                        help="an adapter from `sam3d finetune`, loaded on top of the model's weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--window", default="auto", metavar="WINDOW",
                        help="intensity window: auto, a CT preset (soft_tissue, lung, bone, brain, liver), "
                             "W,L in image units, or pLOW,HIGH percentiles (e.g. p0.5,99.5)")


def parse_numbers(text: str, count: int, what: str) -> list[float]:
    """``count`` comma-separated numbers, or an InputError naming ``what``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise InputError(f"{what} must be {count} comma-separated numbers; got {text!r}.")
    return values


def parse_window(text: str):
    """A WindowSpec from "auto", a preset name, "W,L" or "pLOW,HIGH"."""
    from ..data.intensity import CT_PRESETS, WindowSpec

    text = text.strip()
    if text == "auto":
        return WindowSpec()
    if text in CT_PRESETS:
        return WindowSpec.preset(text)
    if text.lower().startswith("p"):
        low, high = parse_numbers(text[1:], 2, "--window pLOW,HIGH")
        return WindowSpec.percentiles(low, high)
    if "," in text:
        width, level = parse_numbers(text, 2, "--window W,L")
        return WindowSpec.window(width, level)
    raise InputError(
        f"Unknown window {text!r}; use auto, one of {', '.join(CT_PRESETS)}, W,L or pLOW,HIGH."
    )


def to_kji(volume, values: list[float], ras: bool) -> tuple[float, float, float]:
    """Voxel (k, j, i) of an IJK index triple or (with ``ras``) a RAS point."""
    if ras:
        k, j, i = np.round(volume.ras_to_kji(values), 6)  # drop floating-point noise of the inverse
        return float(k), float(j), float(i)
    i, j, k = values
    return float(k), float(j), float(i)


def build_prompt(volume, axis: int, points, negatives, box, ras: bool, mask_labels=None):
    """The SlicePrompt of the command's coordinates (and the mask file's slice)."""
    from ..data.prompts import SlicePrompt, prompt_from_voxels
    from ..data.volume import get_slice

    positive = [to_kji(volume, parse_numbers(p, 3, "--point"), ras) for p in points]
    negative = [to_kji(volume, parse_numbers(p, 3, "--negative"), ras) for p in negatives]
    corners = None
    if box is not None:
        values = parse_numbers(box, 6, "--box")
        corners = (to_kji(volume, values[:3], ras), to_kji(volume, values[3:], ras))
    _check_inside(volume, positive + negative + list(corners or ()), ras)
    _check_clicks(positive, negative, corners, axis, box)
    object_mask = None if mask_labels is None else mask_labels != 0
    if object_mask is not None and not object_mask.any():
        raise InputError("The --mask file is empty (all zero); paint the object or drop --mask.")
    if not positive and corners is None:
        if object_mask is None:
            raise PromptError("Give at least one --point, a --box or a --mask to say what to segment.")
        if negative:
            raise PromptError("Exclude points need an include point or a box on the same slice.")
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(object_mask.sum(axis=other)))
        return SlicePrompt(axis=axis, index=index, mask=get_slice(object_mask, axis, index).copy())
    prompt = prompt_from_voxels(axis, positive, negative, corners)
    if object_mask is not None:
        prompt = SlicePrompt(axis, prompt.index, prompt.points, prompt.box,
                             get_slice(object_mask, axis, prompt.index).copy())
    return prompt


def _check_inside(volume, kji_points, ras: bool) -> None:
    shape = np.asarray(volume.shape)
    for kji in kji_points:
        kji = np.asarray(kji)
        if np.any(kji < -0.5) or np.any(kji > shape - 0.5):
            i, j, k = kji[::-1]
            where = f" (voxel i,j,k {i:.1f},{j:.1f},{k:.1f})" if ras else ""
            raise PromptError(
                f"A point or box corner{where} lies outside the image of size i,j,k "
                f"{shape[2]},{shape[1]},{shape[0]}. "
                + ("Check the RAS coordinates (Slicer shows them in the data probe)." if ras
                   else "IJK indices are zero-based; use --ras for millimetres.")
            )


def _check_clicks(positive, negative, corners, axis: int, box_text) -> None:
    """PromptError, in the user's I,J,K terms, for a voxel both included and excluded or a flat box."""
    included = {tuple(int(round(c)) for c in kji) for kji in positive}
    for kji in negative:
        voxel = tuple(int(round(c)) for c in kji)
        if voxel in included:
            k, j, i = voxel
            raise PromptError(f"--point and --negative name the same voxel (i,j,k {i},{j},{k}); remove one of them.")
    in_slice = [a for a in (2, 1, 0) if a != axis]  # array axes, in I,J,K order
    narrow = [a for a in in_slice if corners is not None and abs(corners[1][a] - corners[0][a]) < 1]
    if narrow:
        raise PromptError(
            f"--box {box_text} is less than one voxel wide along {' and '.join('KJI'[a] for a in narrow)}: "
            f"give two opposite corners of a box on one slice along {'KJI'[axis]}, at least one voxel apart "
            f"along {' and '.join('KJI'[a] for a in in_slice)}."
        )


def check_slice_range(slice_range, volume, axis: int):
    """The (first, last) slice range as integers inside the volume, or an InputError."""
    if slice_range is None:
        return None
    first, last = slice_range
    count = volume.shape[axis]
    if first != int(first) or last != int(last) or not 0 <= first <= last < count:
        raise InputError(
            f"--slice-range {first:g},{last:g}: give whole slice numbers FIRST <= LAST from 0 to {count - 1} "
            f"(the slices along {'KJI'[axis]})."
        )
    return int(first), int(last)


class ProgressBar(TextProgress):
    """The propagation's progress bar: the slice being computed."""

    def __init__(self, stream=None, width: int = 30):
        super().__init__("propagating ", stream, width)

    def __call__(self, done: int, total: int, index: int) -> None:
        self.show(done, total, f"slice {index}" if index >= 0 else "done", finished=index < 0)


def propagate(session, prompt, direction: str = "both", slice_range=None, component: str = "prompted",
              progress=None):
    """Add ``prompt`` as object 1, propagate, keep the chosen 3D component; the result."""
    from ..data.volume import get_slice
    from ..engines.postprocess import keep_component
    from ..engines.session import PropagationOptions

    session.add_prompt(1, prompt)
    result = session.propagate(1, PropagationOptions(direction=direction, slice_range=slice_range),
                               progress=progress)
    if component != "none":
        seeds = np.zeros(result.mask.shape, dtype=bool)
        get_slice(seeds, prompt.axis, prompt.index)[...] = session.anchor_result(1, prompt.index).mask
        result.mask = keep_component(result.mask, component, seeds)
    return result


def write_output(mask: np.ndarray, volume, path: str | Path, name: str) -> Path:
    """Write the mask as a .seg.nrrd (Slicer segmentation) or a label map (.nii.gz/.nii/.nrrd)."""
    from ..data import volume_files

    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        return volume_files.write_segmentation({1: mask}, volume, path, names={1: name})
    return volume_files.write_label_map(mask, volume, path)


def open_remote(args, volume, axis: int, window):
    """A session on the --server (its own engine, unless --engine / --model name one)."""
    from ..serving.client import open_remote_session

    if args.checkpoint or args.adapter or args.device != "auto":
        raise InputError("--checkpoint, --adapter and --device apply to the server: give them to `sam3d serve`.")
    session = open_remote_session(args.server, volume, axis, token_file=args.token_file, window=window,
                                  engine=None if args.engine == "auto" else args.engine, model=args.model)
    print(f"engine: {session.engine_name} (on the server {args.server})")
    return session


def run(args) -> int:
    from ..data import volume_files
    from ..data.volume import check_segmentable
    from ..engines.choice import choose_engine, open_session

    axis = AXES[args.axis]
    window = parse_window(args.window)
    slice_range = parse_numbers(args.slice_range, 2, "--slice-range") if args.slice_range else None
    volume_files.check_output_path(args.out, SEGMENTATION_SUFFIXES, "the segmentation (--out)")
    choice = None if args.server else choose_engine(args.engine, args.model, args.checkpoint, args.adapter)
    volume = volume_files.read_volume(args.image, component=args.component)
    check_segmentable(volume)
    slice_range = check_slice_range(slice_range, volume, axis)
    labels = volume_files.read_label_map(args.mask, volume) if args.mask else None
    prompt = build_prompt(volume, axis, args.point, args.negative, args.box, args.ras, labels)
    prompt.validate(volume.shape)
    started = time.perf_counter()
    if args.server:
        session = open_remote(args, volume, axis, window)
    else:
        print(f"engine: {choice.engine} ({choice.reason})")
        session = open_session(choice, volume, axis, device=args.device, window=window)
    try:
        progress = None if args.no_progress else ProgressBar()
        result = propagate(session, prompt, args.direction, slice_range, args.keep, progress)
        encoded = session.slices_encoded_total
    finally:
        session.close()
    path = write_output(result.mask, volume, args.out, args.name)
    print_summary(result, volume, time.perf_counter() - started, encoded)
    print(f"wrote {path}")
    return 0


def print_summary(result, volume, seconds: float, encoded_total: int | None = None) -> None:
    """One line on the object; ``encoded_total`` is the session's encoder runs, preview included
    (the volumetric engine encodes 3D crops, not slices)."""
    slices = result.slices_with_object
    voxels = int(np.count_nonzero(result.mask))
    millilitres = voxels * float(np.prod(volume.spacing_kji)) / 1000.0
    span = f"slices {slices[0]}..{slices[-1]} ({len(slices)})" if slices else "no slices"
    encoded = f"{result.slices_encoded} slices encoded"
    if result.engine == "volumetric" and encoded_total is not None:
        encoded = f"{encoded_total} 3D crop{'s' if encoded_total != 1 else ''} encoded"
    print(f"object: {voxels} voxels, {millilitres:.1f} ml, {span}; {encoded}; {seconds:.1f} s")
    for run_key, reason in sorted(result.stop_reasons.items()):
        print(f"  run {run_key}: {reason}")
