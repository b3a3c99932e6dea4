"""The README's Python example runs as written (on the sample volume, weight-free engine)."""

import re
from pathlib import Path

import numpy as np

from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.data.volume_files import image_from_array

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    import SimpleITK as sitk

    block = re.search(r"## Python\n\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    sample = make_sample(shape_kji=(24, 88, 100))
    sitk.WriteImage(image_from_array(sample.volume.array, sample.volume.ijk_to_ras), str(tmp_path / "ct.nii.gz"))
    k, j, i = sample.click_kji
    block = block.replace("SlicePrompt(0, 40, points=(Point(row=120, col=200),))",
                          f"SlicePrompt(0, {k}, points=(Point(row={j}, col={i}),))")
    block = block.replace("set_slice_mask(1, 52, corrected_slice)", f"set_slice_mask(1, {k + 2}, corrected_slice)")
    monkeypatch.chdir(tmp_path)
    namespace = {"corrected_slice": sample.truth[k + 2]}
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.mask.any() and np.array_equal(result.mask[k + 2], sample.truth[k + 2])
    assert (tmp_path / "out.seg.nrrd").is_file()
