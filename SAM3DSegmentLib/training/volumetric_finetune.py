"""Fine-tuning a 3DSAM-adapter checkpoint on the user's (volume, label) pairs.

What is trained is what the authors' ``train.py`` trains (:func:`~..models.sam3d_adapter.mark_trainable`):
SAM's ViT weights stay frozen; the spatial adapters, the blocks' LayerNorms, the slice and depth
embeddings, the depth relative positions, the necks, the click encoder inference uses and the
3D decoder are trained. The three other prompt encoders a checkpoint stores (and one attention of
the used one) are never called, so they are neither trained nor saved.

Training follows the authors' ``train.py`` and their dataset code where it fits a CPU:

- each volume is prepared as inference prepares it (:mod:`~..engines.volumetric`: resampled to
  1 mm, clipped and normalised with the dataset's statistics); the label is resampled the same
  way and thresholded at 0.5, as their dataset code does;
- a training crop of the model's size (128^3 at full size) is centred, as inference centres it,
  on the clicks: 1 to ``max_clicks`` voxels drawn inside the label (seeded), the crop then
  shifted by up to ``crop_shift`` voxels and flipped along each axis with probability 1/2
  (their random crops and flips; their zoom, rotation and intensity shift are left out);
- loss = 0.5 Dice + 0.5 cross-entropy on the two-class softmax (their ``DiceCELoss``), AdamW with
  lr 4e-4 and no weight decay, gradients clipped to norm 1 (encoder, click encoder, decoder
  each), the learning rate falling linearly to 1 % over the epochs, batch of one crop.

Unlike the LiteMedSAM fine-tuning (:mod:`.finetune`) nothing can be cached: the adapters sit
inside the image encoder, so every step runs the whole encoder forward and backward.
``recompute_blocks`` keeps only each block's input for the backward pass and recomputes the
rest (``torch.utils.checkpoint``): a step at full size peaked at 10 GB on a CPU (about 30 GB
without), for one more forward pass of the blocks.

A validation split (by volume when there are three or more targets, else fixed crops of the
training volumes) keeps the best epoch by Dice and stops early; a checkpoint after each epoch
lets a stopped run resume. The result is an adapter file (:mod:`~..models.adapters`) holding
only the trained tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.volume import Volume
from ..engines.volumetric import CropPlan, cut_crop, normalise, plan_crop, resample_to_spacing
from ..errors import InputError
from ..models.adapters import SAM3D_ADAPTER_FAMILY
from ..models.sam3d_adapter import DATASET_INTENSITY, Sam3DAdapter, mark_trainable
from .epochs import EPOCH_MESSAGE, CheckpointKind, FinetuneResult, run_epochs
from .finetune import split_slices
from .slices import Progress

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sam3d-volumetric-finetune-checkpoint-1"
CHECKPOINT = CheckpointKind(CHECKPOINT_FORMAT, "`sam3d finetune --engine volumetric`", "another base checkpoint or model")
UNUSED_PARTS = ("prompt_encoders.0.", "prompt_encoders.1.", "prompt_encoders.2.")
"""Prompt encoders a checkpoint stores but inference never calls (it uses the fourth)."""


@dataclass(frozen=True)
class VolumetricFinetuneConfig:
    """Training settings (stored in the adapter and the checkpoint)."""

    dataset: str = "kits"
    """The intensity handling of the base checkpoint (kits, lits, pancreas, colon)."""
    epochs: int = 20
    crops_per_case: int = 4
    """Training crops drawn from each training target per epoch (one step each)."""
    learning_rate: float = 4e-4
    weight_decay: float = 0.0
    max_clicks: int = 3
    """Each training crop is prompted with 1 to this many clicks inside the label."""
    crop_shift: int | None = None
    """The crop moves by up to this many 1-mm voxels per axis (None: an eighth of the crop)."""
    flips: bool = True
    grad_clip: float = 1.0
    validation_fraction: float = 0.2
    validation_crops: int = 2
    """Fixed validation crops per validation target (one click each, no shift or flip)."""
    patience: int = 3
    recompute_blocks: bool = True
    max_minutes: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.dataset not in DATASET_INTENSITY:
            raise InputError(f"Unknown 3DSAM-adapter dataset {self.dataset!r}; choose one of {', '.join(DATASET_INTENSITY)}.")
        if min(self.epochs, self.crops_per_case, self.max_clicks, self.patience, self.validation_crops) < 1:
            raise InputError("epochs, crops per case, clicks, patience and validation crops must be at least 1.")
        if self.learning_rate <= 0:
            raise InputError(f"The learning rate must be positive; got {self.learning_rate}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(f"The validation fraction must be in [0, 1); got {self.validation_fraction}.")

    def learning_rate_at(self, epoch: int) -> float:
        """The authors' linear decay (``LinearLR`` from 1 to 0.01 over the epochs) for epoch 1, 2, ..."""
        return self.learning_rate * (1.0 - 0.99 * (epoch - 1) / self.epochs)

    def shift(self, crop_size: int) -> int:
        return crop_size // 8 if self.crop_shift is None else max(int(self.crop_shift), 0)


@dataclass
class VolumeCase:
    """One target prepared for training: the normalised 1-mm image and label around it."""

    name: str
    image: torch.Tensor
    """(D, H, W) float32: the normalised 1-mm image, cut to the part crops can reach."""
    label: torch.Tensor
    """(D, H, W) float32 0/1 on the same grid."""
    foreground: np.ndarray
    """(N, 3) int32 (d, h, w) voxels of the label, where clicks are drawn."""
    origin: tuple[int, int, int] = (0, 0, 0)
    """Where ``image`` starts in the volume's 1-mm grid."""


@dataclass
class TrainingCrop:
    """One model input and its answer."""

    case: str
    crop: torch.Tensor
    """(S, S, S) normalised image."""
    target: torch.Tensor
    """(S, S, S) float 0/1."""
    clicks: torch.Tensor
    """(N, 3) float (d, h, w) voxel indices in the crop."""


# --- data ------------------------------------------------------------------------------------


def prepare_case(volume: Volume, reference: np.ndarray, config: VolumetricFinetuneConfig, crop_size: int,
                 name: str = "") -> VolumeCase:
    """A (volume, target mask) pair as training sees it: resampled and normalised exactly as
    :class:`~..engines.volumetric.VolumetricSession` prepares a volume, the label resampled
    (trilinear, > 0.5), both cut to the target's box plus the reach of a crop."""
    intensity = DATASET_INTENSITY[config.dataset]
    reference = np.asarray(reference, dtype=bool)
    what = name or volume.name or "the volume"
    if reference.shape != volume.array.shape:
        raise InputError(f"Label of {what} has shape {reference.shape}, the image {volume.array.shape}.")
    if not reference.any():
        raise InputError(f"The target is empty in {what}: nothing to train on.")
    image = normalise(resample_to_spacing(volume.array, volume.spacing_kji, intensity.spacing_mm), intensity)
    label = resample_to_spacing(reference.astype(np.float32), volume.spacing_kji, intensity.spacing_mm) > 0.5
    if not label.any():
        raise InputError(f"The target of {what} vanishes at 1 mm (smaller than a voxel there): leave it out.")
    inside = label.nonzero()
    margin = crop_size - crop_size // 2 + config.shift(crop_size) + 1
    low = [max(int(v) - margin, 0) for v in inside.min(0).values]
    high = [min(int(v) + margin + 1, n) for v, n in zip(inside.max(0).values, label.shape)]
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    # beyond the box the crops reach only where the volume ends, where inference pads with zeros too
    image, label = image[box].clone(), label[box].clone()
    foreground = (inside - torch.tensor(low)).numpy().astype(np.int32)
    log.info("%s: %d target voxels at 1 mm, region %s of the 1-mm grid", what, len(foreground), tuple(image.shape))
    return VolumeCase(name or volume.name, image, label.float(), foreground, tuple(low))


def sample_crop(case: VolumeCase, crop_size: int, rng: np.random.Generator, max_clicks: int,
                shift: int, flips: bool) -> TrainingCrop:
    """A crop centred on clicks drawn inside the label (as inference centres it), then moved by up
    to ``shift`` voxels (when the clicks stay inside) and flipped at random."""
    n_clicks = int(rng.integers(1, max_clicks + 1))
    clicks = case.foreground[rng.integers(len(case.foreground), size=n_clicks)].astype(np.int64)
    plan = plan_crop(clicks, crop_size)
    move = rng.integers(-shift, shift + 1, size=3) if shift > 0 else np.zeros(3, dtype=np.int64)
    moved = plan.clicks - move
    if (moved >= 0).all() and (moved < crop_size).all():
        plan = CropPlan(tuple(int(s) for s in np.asarray(plan.start) + move), crop_size, moved)
    crop, target = cut_crop(case.image, plan), cut_crop(case.label, plan)
    points = torch.as_tensor(plan.clicks, dtype=torch.float32)
    if flips:
        for axis in range(3):
            if rng.random() < 0.5:
                crop, target = crop.flip(axis), target.flip(axis)
                points[:, axis] = crop_size - 1 - points[:, axis]
    return TrainingCrop(case.name, crop.contiguous(), target.contiguous(), points)


def validation_set(cases: list[VolumeCase], crops_per_case: int, crop_size: int, seed: int) -> list[TrainingCrop]:
    """Fixed crops as the user's first click gives them: one click inside the label, centred, no flip."""
    rng = np.random.default_rng([seed, 7919])
    return [sample_crop(case, crop_size, rng, 1, 0, False) for case in cases for _ in range(crops_per_case)]


# --- model -----------------------------------------------------------------------------------


def trained_names(model: Sam3DAdapter) -> list[str]:
    """Parameters the fine-tuning trains: the authors' rule (:func:`mark_trainable`), less the
    parts inference never calls (so they get no gradient). Leaves only those trainable."""
    mark_trainable(model)
    names = []
    for name, parameter in model.named_parameters():
        used = not name.startswith(UNUSED_PARTS) and ".cross_attn_token_to_image." not in name
        parameter.requires_grad_(parameter.requires_grad and used)
        if parameter.requires_grad:
            names.append(name)
    return names


@contextlib.contextmanager
def recomputed_blocks(model: Sam3DAdapter, enabled: bool = True):
    """Within: the encoder blocks keep only their input for the backward pass (activation checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.encoder.blocks) if enabled else []
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' loss: 0.5 x Dice of the foreground softmax + 0.5 x cross-entropy (MONAI's
    ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)``); logits (1, 2, S, S, S)."""
    foreground = torch.softmax(logits, dim=1)[:, 1]
    target = target.to(logits.device).reshape(foreground.shape)
    inter = (foreground * target).sum()
    dice = 1 - (2 * inter + 1e-5) / (foreground.sum() + target.sum() + 1e-5)
    ce = F.cross_entropy(logits, target.long())
    return 0.5 * dice + 0.5 * ce


def crop_logits(model: Sam3DAdapter, crop: TrainingCrop, device) -> torch.Tensor:
    """(1, 2, S, S, S) logits for a crop, with the model input the session gives it."""
    image = crop.crop.to(device)
    return model(image.expand(3, -1, -1, -1), crop.clicks.to(device))


def validation_dice(model: Sam3DAdapter, crops: list[TrainingCrop], device) -> float:
    """Mean Dice of the foreground (argmax) on the validation crops (1 when both are empty); NaN without crops."""
    if not crops:
        return float("nan")
    scores = []
    with torch.no_grad():
        for crop in crops:
            prediction = crop_logits(model, crop, device).argmax(1)[0].cpu() == 1
            target = crop.target > 0.5
            total = int(prediction.sum() + target.sum())
            scores.append(1.0 if total == 0 else 2 * int((prediction & target).sum()) / total)
    return float(np.mean(scores))


# --- training --------------------------------------------------------------------------------


def finetune_volumetric(
    model: Sam3DAdapter,
    cases: list[VolumeCase],
    config: VolumetricFinetuneConfig = VolumetricFinetuneConfig(),
    *,
    base_sha256: str = "",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> FinetuneResult:
    """Train ``model`` (loaded from the base checkpoint) on ``cases``; only :func:`trained_names` change.

    The model ends with the best epoch's tensors (by validation Dice; the last epoch without a
    validation set). With ``checkpoint_path`` a checkpoint is written after every epoch, and
    ``resume`` continues from it (same settings and cases).
    """
    config.check()
    if not cases:
        raise InputError("No training targets: the labels hold no target.")
    device = torch.device(device)
    model.to(device).eval()  # no dropout or batch norm: eval keeps the frozen parts as they are
    names = trained_names(model)
    parameters = dict(model.named_parameters())
    groups = [[parameters[n] for n in names if n.startswith(prefix)]
              for prefix in ("encoder.", "prompt_encoders.", "decoder.")]
    optimizer = torch.optim.AdamW([parameters[n] for n in names], lr=config.learning_rate, weight_decay=config.weight_decay)
    size = model.cfg.crop_size
    train, held_out = split_slices(cases, config.validation_fraction, config.seed)
    if config.validation_fraction <= 0:
        how, validation = "none", []
    elif held_out:
        how, validation = "by volume", validation_set(held_out, config.validation_crops, size, config.seed)
    else:
        how, validation = "by crop", validation_set(train, config.validation_crops, size, config.seed)
        log.warning("Fewer than 3 targets: validation crops come from the training volumes (an optimistic Dice).")
    shift = config.shift(size)

    def train_epoch(epoch: int) -> Iterator[float]:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate_at(epoch)
        rng = np.random.default_rng([config.seed, epoch])
        for index in rng.permutation(np.repeat(np.arange(len(train)), config.crops_per_case)):
            crop = sample_crop(train[index], size, rng, config.max_clicks, shift, config.flips)
            with recomputed_blocks(model, config.recompute_blocks):
                loss = dice_ce_loss(crop_logits(model, crop, device), crop.target)
                optimizer.zero_grad()
                loss.backward()
            for group in groups:
                torch.nn.utils.clip_grad_norm_(group, config.grad_clip)
            optimizer.step()
            yield float(loss.detach())

    result = run_epochs(
        model, names, optimizer, config, train_epoch=train_epoch,
        validate=(lambda: validation_dice(model, validation, device)) if validation else None,
        steps_per_epoch=len(train) * config.crops_per_case, kind=CHECKPOINT, base_sha256=base_sha256,
        checkpoint_path=checkpoint_path, resume=resume, progress=progress,
        epoch_message=EPOCH_MESSAGE + " ({seconds:.0f} s)",
    )
    result.metadata = {
        "base_model": f"3dsam_adapter_{config.dataset}", "family": SAM3D_ADAPTER_FAMILY,
        "base_sha256": base_sha256, "dataset": config.dataset, "model_config": asdict(model.cfg),
        "trained": sorted({".".join(n.split(".")[:2]) for n in names}), "settings": asdict(config),
        "validation": how, "validation_dice": result.validation_dice,
        "validation_dice_base": result.validation_dice_base,
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "training_targets": len(train), "validation_crops": len(validation),
        "cases": sorted({c.name for c in cases}), "training_seconds": round(result.seconds, 1),
    }
    return result
