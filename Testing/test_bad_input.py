"""Bad or awkward input never gives a confident wrong answer or a traceback (issue 14).

One table: each row is a case id, what is run (a ``sam3d`` command line, in-process, or a call of
the Python API), the expected exit code or exception type, words the message must (and must not)
hold, and whether an output file may be left. To add a case, add a row; the files it needs come
from the ``files`` fixture.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.data.volume_files import image_from_array, read_label_map, read_volume
from SAM3DSegmentLib.errors import CheckpointError, InputError, PromptError, SAM3DError


@dataclass(frozen=True)
class Case:
    """``run(files, out)`` returns argv for ``sam3d`` (expected: an exit code) or calls the API
    (expected: an exception type); ``out`` is the (empty) folder outputs go to."""

    id: str
    run: Callable
    expected: int | type
    words: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    writes: bool = False


def segment(image: str, *extra: str, out: str = "{out}/result.nii.gz", click: bool = True, engine: str = "weightfree"):
    """argv of ``sam3d segment`` on ``files.<image>`` with the sample click."""

    def argv(files, out_path):
        args = ["segment", str(getattr(files, image)), "--no-progress", "--out", out.format(out=out_path)]
        args += ["--point", files.click] if click else []
        args += ["--engine", engine] if engine else []
        return args + [a.format(click=files.click, out=out_path) for a in extra]

    return argv


def api(call: Callable) -> Callable:
    """A row that calls the Python API: ``call(files, out)`` must raise."""
    return call


def _open_session(files, axis=0, volume=None):
    from SAM3DSegmentLib.engines.choice import choose_engine, open_session

    return open_session(choose_engine("weightfree"), volume or files.sample.volume, axis=axis)


def _write_float_labels(files, out):
    from SAM3DSegmentLib.data.volume_files import write_segmentation

    volume = files.sample.volume
    write_segmentation(np.full(volume.shape, 0.5), volume, out / "labels.seg.nrrd")


def _write_into_proc(files, out):
    from SAM3DSegmentLib.data.volume_files import write_segmentation

    write_segmentation({1: files.sample.truth}, files.sample.volume, "/proc/sam3d_test.seg.nrrd")


def _zero_size_axis(files, out):
    from SAM3DSegmentLib.data.volume import Volume

    Volume(np.zeros((0, 4, 4), np.int16))


def _point_of_strings(files, out):
    from SAM3DSegmentLib.data.prompts import Point

    Point("a", "b")


def _negative_patience(files, out):
    from SAM3DSegmentLib.engines.session import StopRule

    StopRule(patience=-1)


def _constant_volume_session(files, out):
    from SAM3DSegmentLib.data.volume import Volume

    _open_session(files, volume=Volume(np.zeros((6, 20, 20), np.int16), name="blank"))


def _other_sam2_size(files, out):
    from SAM3DSegmentLib.models.builders import build_model

    build_model("sam2.1_hiera_small", files.sam2_tiny_checkpoint(), "cpu")


def _vit_b_weights_for_vit_l(files, out):
    import torch

    from SAM3DSegmentLib.models.checkpoint_state import load_state_strict
    from SAM3DSegmentLib.models.registry import get_spec

    state = {"image_encoder.patch_embed.proj.weight": torch.empty(768, 3, 16, 16, device="meta")}
    load_state_strict(torch.nn.Linear(2, 2), state, get_spec("sam_vit_l"), "sam_vit_b_01ec64.pth")


def _same_pixel_include_exclude(files, out):
    from SAM3DSegmentLib.data.prompts import Point, SlicePrompt

    SlicePrompt(0, 3, points=(Point(5, 6), Point(5, 6, False))).validate(files.sample.volume.shape)


CASES = [
    # 1. a truncated file is not read with zeros in place of the missing voxels
    Case("1-truncated-nii-gz", segment("truncated_gz"), 2, ("truncated", "again")),
    Case("1-truncated-nii", segment("truncated_nii"), 2, ("truncated", "bytes")),
    Case("1-truncated-read_volume", api(lambda f, o: read_volume(f.truncated_gz)), InputError, ("truncated",)),
    # 2. nothing to segment
    Case("2-all-zero", segment("zeros"), 2, ("same value (0)", "nothing to segment")),
    Case("2-all-nan", segment("all_nan"), 2, ("NaN or infinite", "replace them")),
    Case("2-constant-api", api(_constant_volume_session), InputError, ("same value",)),
    # 3. NaN / Inf voxels (SimpleITK reads them as 0 in NIfTI) are an error, not used as they are
    Case("3-nan-block", segment("nan_block"), 2, ("40 NaN or infinite",)),
    Case("3-inf-block", segment("inf_block"), 2, ("40 NaN or infinite",)),
    # 4. voxel sizes in other units
    Case("4-spacing-1e6", segment("huge_spacing"), 2, ("voxel size", "1e+06", "spacing in mm")),
    Case("4-spacing-1e-6", segment("tiny_spacing"), 2, ("voxel size", "1e-06", "spacing in mm")),
    # 5. a NIfTI header with a size-0 axis
    Case("5-dim3-zero", segment("zero_dim"), 2, ("size 0",)),
    # 6. a device that is not there, with the default engine and the weight-free one
    Case("6-cuda-99-default-engine", segment("image", "--device", "cuda:99", engine=""), 2, ("CUDA", "auto")),
    Case("6-tpu-default-engine", segment("image", "--device", "tpu", engine=""), 2, ("tpu", "cpu")),
    Case("6-cuda-99-weightfree", segment("image", "--device", "cuda:99"), 2, ("CUDA", "auto")),
    # 7. an absent model is an error that says how to get it (MedSAM has no direct download)
    Case("7-absent-medsam", segment("image", "--model", "medsam_vit_b", engine=""), 2,
         ("medsam_vit_b", "--checkpoint"), absent=("sam3d models download medsam_vit_b",)),
    # 8. the same voxel included and excluded
    Case("8-point-and-negative", segment("image", "--negative", "{click}"), 2, ("same voxel", "remove one")),
    Case("8-api", api(_same_pixel_include_exclude), PromptError, ("include and an exclude",)),
    # 9. float labels are not written as an empty segment
    Case("9-float-labels", api(_write_float_labels), InputError, ("non-integer",)),
    # 10. an upper-case extension is written
    Case("10-upper-case-suffix", segment("image", out="{out}/X.NII.GZ"), 0, ("wrote",), writes=True),
    # 11. an unwritable folder is found before the computation
    Case("11-proc-nii-gz", segment("image", out="/proc/sam3d_x.nii.gz"), 2, ("does not take new files",)),
    Case("11-proc-seg-nrrd", segment("image", out="/proc/sam3d_x.seg.nrrd"), 2, ("does not take new files",)),
    Case("11-read-only-folder", segment("image", out="{out}/locked/x.seg.nrrd"), 2, ("does not take new files",)),
    Case("11-parent-is-a-file", segment("image", out="{out}/file.txt/x.nii.gz"), 2, ("is a file, not a folder",)),
    # 12. --out naming a folder
    Case("12-out-is-a-folder", segment("image", out="{out}/folder.nii.gz"), 2, ("is a folder",)),
    # 13. the Python API raises the library's own errors
    Case("13-zero-size-axis", api(_zero_size_axis), InputError, ("size 0",)),
    Case("13-axis-3", api(lambda f, o: _open_session(f, axis=3)), InputError, ("0, 1 or 2",)),
    Case("13-point-of-strings", api(_point_of_strings), PromptError, ("finite numbers",)),
    Case("13-write-into-proc", api(_write_into_proc), InputError, ("does not take new files",)),
    # 14. a missing checkpoint is named as missing
    Case("14-missing-checkpoint", segment("image", "--checkpoint", "/nope.pth", engine=""), 2, ("does not exist",)),
    Case("14-missing-sam2-checkpoint", segment("image", "--checkpoint", "any_name.pth", engine="sam2"), 2,
         ("does not exist",)),
    Case("14-unknown-checkpoint-name", segment("image", "--checkpoint", "{out}/../unknown.pth", engine="sam2"), 2,
         ("add --model", "sam2.1_hiera_tiny"), absent=("sam_vit_b",)),
    # 15. a folder without DICOM: our message only, no ITK warnings
    Case("15-not-dicom", segment("not_dicom"), 2, ("no DICOM series",), absent=("WARNING", "GDCM")),
    # 16. a flat box in the I,J,K the user typed
    Case("16-degenerate-box", segment("image", "--box", "{click},{click}", click=False), 2,
         ("--box", "less than one voxel wide along I and J"), absent=("Box(",)),
    # 17. another size of the same family: a short message naming the mix-up
    Case("17-sam2-tiny-as-small", api(_other_sam2_size), CheckpointError, ("does not fit", "hiera_small")),
    Case("17-vit-b-as-vit-l", api(_vit_b_weights_for_vit_l), CheckpointError, ("ViT-B", "--model sam_vit_b")),
    # 18. stop rule values out of range
    Case("18-negative-patience", api(_negative_patience), InputError, ("patience", ">= 1")),
    # 19. --axis digits are array axes: the help says so
    Case("19-axis-help", lambda f, o: ["segment", "--help"], 0, ("0 = k, 1 = j, 2 = i",)),
    # the same standard elsewhere
    Case("slice-range-outside", segment("image", "--slice-range", "2,500"), 2, ("FIRST <= LAST",)),
    Case("component-of-a-3d-image", segment("image", "--component", "3"), 2, ("no component 3",)),
    Case("eval-out-is-a-file", lambda f, o: ["eval", "--data", str(f.not_dicom), "--out", f"{o}/file.txt/r"], 2,
         ("is a file, not a folder",)),
    Case("eval-negative-rounds", lambda f, o: ["eval", "--data", str(f.not_dicom), "--rounds", "-1",
                                               "--out", str(o / "r")], 2, ("--rounds",)),
    Case("eval-negative-patience", lambda f, o: ["eval", "--data", str(f.not_dicom), "--patience", "0",
                                                 "--out", str(o / "r")], 2, ("patience",)),
]


def _write(array: np.ndarray, path: Path, ijk_to_ras: np.ndarray, spacing=None) -> Path:
    image = image_from_array(array, ijk_to_ras)
    if spacing is not None:
        image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(path))
    return path


def _truncated(source: Path, target: Path, keep: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The sample case and the bad files made from it."""
    folder = tmp_path_factory.mktemp("bad_input")
    sample = make_sample(shape_kji=(12, 40, 48))
    array, geometry = sample.volume.array, sample.volume.ijk_to_ras
    k, j, i = sample.click_kji
    block = (slice(k - 1, k + 1), slice(j - 2, j + 2), slice(i - 2, i + 3))  # 40 voxels around the click
    with_nan, with_inf = array.astype(np.float32), array.astype(np.float32)
    with_nan[block], with_inf[block] = np.nan, np.inf
    plain = _write(array, folder / "plain.nii", geometry)
    zero_dim = folder / "zero_dim.nii"
    header = bytearray(plain.read_bytes())
    header[46:48] = (0).to_bytes(2, "little")  # dim[3] = 0
    zero_dim.write_bytes(bytes(header))
    (folder / "not_dicom").mkdir()
    (folder / "not_dicom" / "notes.txt").write_text("not an image")
    checkpoint = folder / "sam2_tiny_random.pt"

    def sam2_tiny_checkpoint() -> Path:
        if not checkpoint.exists():
            import torch

            from SAM3DSegmentLib.models.builders import build_model

            torch.manual_seed(0)
            torch.save({"model": build_model("sam2.1_hiera_tiny", None, "cpu").state_dict()}, checkpoint)
        return checkpoint

    image = _write(array, folder / "image.nii.gz", geometry)
    return SimpleNamespace(
        sample=sample, click=f"{i},{j},{k}", image=image, not_dicom=folder / "not_dicom",
        truncated_gz=_truncated(image, folder / "truncated.nii.gz", 1 / 3),
        truncated_nii=_truncated(plain, folder / "truncated.nii", 2 / 3),
        zeros=_write(np.zeros_like(array), folder / "zeros.nii.gz", geometry),
        all_nan=_write(np.full(array.shape, np.nan, np.float32), folder / "all_nan.nii.gz", geometry),
        nan_block=_write(with_nan, folder / "nan_block.nii.gz", geometry),
        inf_block=_write(with_inf, folder / "inf_block.nii", geometry),
        huge_spacing=_write(array, folder / "huge.nii.gz", geometry, 1e6),
        tiny_spacing=_write(array, folder / "tiny.nii.gz", geometry, 1e-6),
        zero_dim=zero_dim, sam2_tiny_checkpoint=sam2_tiny_checkpoint,
    )


@pytest.fixture
def out_folder(tmp_path):
    """An empty output folder, with a folder named like an output, a file where a folder is
    expected, a file ``unknown.pth`` beside it, and a folder ``locked`` that takes no new files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder.nii.gz").mkdir()
    (out / "file.txt").write_text("a file")
    (tmp_path / "unknown.pth").write_bytes(b"not a checkpoint")
    locked = out / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    made_immutable = _chattr("+i", locked)
    yield out
    if made_immutable:
        _chattr("-i", locked)
    locked.chmod(0o755)


def _chattr(flag: str, folder: Path) -> bool:
    """Make ``folder`` immutable (+i) or not (-i), where chattr works (root on ext4 and others)."""
    try:
        return subprocess.run(["chattr", flag, str(folder)], capture_output=True).returncode == 0
    except OSError:
        return False


def _left_behind(out: Path) -> list[str]:
    before = {"folder.nii.gz", "file.txt", "locked"}
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.relative_to(out).parts[0] not in before)


def _locked_takes_files(out: Path) -> bool:
    try:
        (out / "locked" / "probe").touch()
    except OSError:
        return False
    (out / "locked" / "probe").unlink()
    return True


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, files, out_folder, capfd):
    if "proc" in case.id and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    if case.id == "11-read-only-folder" and _locked_takes_files(out_folder):
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    argv = case.run if isinstance(case.expected, int) else None
    if argv is not None:
        try:
            code = main(argv(files, out_folder))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code
        captured = capfd.readouterr()
        message = " ".join((captured.out + captured.err).split())  # help text is wrapped
        assert code == case.expected, message
        if code == 2:
            errors = [line for line in captured.err.splitlines() if ": error: " in line]
            assert len(errors) == 1, captured.err
        assert "Traceback" not in message
    else:
        with pytest.raises(SAM3DError) as raised:
            case.run(files, out_folder)
        assert isinstance(raised.value, case.expected)
        message = str(raised.value) + capfd.readouterr().err
        assert len(str(raised.value)) < 600, str(raised.value)
    for word in case.words:
        assert word in message
    for word in case.absent:
        assert word not in message
    left = _left_behind(out_folder)
    assert bool(left) == case.writes, left
    if case.writes:
        mask = read_label_map(out_folder / left[0], read_volume(files.image))
        assert mask.any()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["result.seg.nrrd", "result.nii.gz"])
def test_a_failed_write_leaves_the_previous_file(files, tmp_path, monkeypatch, failure, name):
    """Writes go to a temporary name and are renamed into place: a write that fails half-way
    leaves the earlier file as it was and no partial file."""
    import slicerio

    from SAM3DSegmentLib.data import volume_files

    volume = files.sample.volume
    target = tmp_path / name
    target.write_bytes(b"the earlier result")

    def half_written(*args, **kwargs):
        Path(next(a for a in args if isinstance(a, str))).write_bytes(b"half")
        raise failure

    monkeypatch.setattr(slicerio, "write_segmentation", half_written)
    monkeypatch.setattr(volume_files._sitk(), "WriteImage", half_written)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else InputError
    with pytest.raises(expected, match=None if expected is KeyboardInterrupt else "No space left"):
        if name.endswith(".seg.nrrd"):
            volume_files.write_segmentation({1: files.sample.truth}, volume, target)
        else:
            volume_files.write_label_map(files.sample.truth, volume, target)
    assert target.read_bytes() == b"the earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_cli_exit_codes_are_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ("0", "1", "2", "130"):
        assert f"`{code}`" in section
