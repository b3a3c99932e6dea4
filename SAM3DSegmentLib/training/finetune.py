"""Parameter-efficient fine-tuning of a SAM-family decoder on cached embeddings.

The base weights stay frozen; the mask decoder (and, optionally, the prompt encoder) is trained
as MedSAM / LiteMedSAM train: box prompts from the label, each side pushed outwards by the
registry's ``box_padding`` plus a random jitter, loss = Dice (squared) + BCE on the low-res mask
logits + MSE of the IoU head against the mask's real IoU. A validation split (Dice on its slices
with the unjittered box) keeps the best epoch and stops early. A checkpoint written after each
epoch lets a stopped run resume. The result is saved as an adapter
(:mod:`~SAM3DSegmentLib.models.adapters`): only the trained tensors and metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.adapters import save_adapter
from ..models.registry import ModelSpec, get_spec
from .epochs import CheckpointKind, EpochRecord, FinetuneResult, run_epochs  # noqa: F401 (EpochRecord: still importable here)
from .slices import Progress, TrainingSlice

CHECKPOINT_FORMAT = "sam3d-finetune-checkpoint-1"
CHECKPOINT = CheckpointKind(CHECKPOINT_FORMAT, "`sam3d finetune`", "another base model or setting")


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings (stored in the adapter and the checkpoint)."""

    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    train_prompt_encoder: bool = False
    validation_fraction: float = 0.2
    patience: int = 3
    """Epochs without a better validation Dice before stopping."""
    box_jitter_px: float = 5.0
    """Each box side moves by up to this many input-frame pixels (on top of the registry's padding)."""
    iou_loss_weight: float = 1.0
    max_minutes: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.patience < 1:
            raise InputError("epochs, batch size, patience and learning rate must be positive.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(f"The validation fraction must be in [0, 1); got {self.validation_fraction}.")


def trained_names(model, train_prompt_encoder: bool) -> list[str]:
    """Names of the parameters a fine-tuning trains."""
    prefixes = ("mask_decoder.", "prompt_encoder.") if train_prompt_encoder else ("mask_decoder.",)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def split_slices(slices: list[TrainingSlice], fraction: float, seed: int) -> tuple[list[TrainingSlice], list[TrainingSlice]]:
    """(training, validation): a seeded random ``fraction`` of the slices for validation (at least
    one when there are three or more)."""
    if fraction <= 0 or len(slices) < 3:
        return list(slices), []
    order = np.random.default_rng(seed).permutation(len(slices))
    n_val = max(1, int(round(fraction * len(slices))))
    chosen = set(order[:n_val].tolist())
    return [s for i, s in enumerate(slices) if i not in chosen], [s for i, s in enumerate(slices) if i in chosen]


def model_boxes(batch: list[TrainingSlice], padding: float, jitter: float, rng: np.random.Generator | None):
    """(B, 4) boxes in the input frame: tight box grown by ``padding`` (+ a jitter in [-jitter, jitter]
    per side when ``rng`` is given), clipped to the slice's frame, floored as LiteMedSAM's inference."""
    boxes = []
    for s in batch:
        grow = np.full(4, padding, dtype=np.float64)
        if rng is not None and jitter > 0:
            grow = np.maximum(grow + rng.uniform(-jitter, jitter, 4), 0.0)
        box = s.box + grow * np.array([-1, -1, 1, 1])
        limit = np.array([s.frame[1] - 1, s.frame[0] - 1] * 2, dtype=np.float64)
        boxes.append(np.floor(np.clip(box, 0, limit)))
    return np.stack(boxes)


def decode(model, batch: list[TrainingSlice], boxes: np.ndarray, grad_prompt: bool):
    """(low-res logits (B, 1, L, L), predicted IoU (B, 1)) for a batch of training slices."""
    import torch

    device = next(model.mask_decoder.parameters()).device
    embeddings = torch.stack([s.embedding for s in batch]).to(device)
    box_tensor = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    with torch.set_grad_enabled(grad_prompt and torch.is_grad_enabled()):
        sparse, dense = model.prompt_encoder(points=None, boxes=box_tensor, masks=None)
        image_pe = model.prompt_encoder.get_dense_pe()
    return model.mask_decoder(
        image_embeddings=embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=False,
    )


def segmentation_loss(logits, targets, iou_pred, iou_weight: float):
    """MedSAM-Lite's loss: Dice (sigmoid, squared denominators) + BCE + ``iou_weight`` x MSE(IoU head, real IoU)."""
    import torch

    probs = torch.sigmoid(logits)
    dims = (1, 2, 3)
    dice = 1 - (2 * (probs * targets).sum(dims) + 1e-5) / ((probs**2).sum(dims) + (targets**2).sum(dims) + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    loss = dice.mean() + bce
    if iou_weight > 0:
        with torch.no_grad():
            pred = (probs > 0.5).float()
            inter = (pred * targets).sum(dims)
            union = pred.sum(dims) + targets.sum(dims) - inter
            iou = inter / union.clamp(min=1e-5)
        loss = loss + iou_weight * torch.nn.functional.mse_loss(iou_pred[:, 0], iou)
    return loss


def validation_dice(model, slices: list[TrainingSlice], padding: float, batch_size: int = 16) -> float:
    """Mean 2D Dice (low-res frame, logits > 0) of the model with the padded label box; NaN without slices."""
    import torch

    if not slices:
        return float("nan")
    scores = []
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            batch = slices[start: start + batch_size]
            logits, _ = decode(model, batch, model_boxes(batch, padding, 0.0, None), False)
            pred = (logits > 0).float().cpu()
            targets = torch.stack([s.target for s in batch])
            inter = (pred * targets).sum((1, 2, 3))
            total = pred.sum((1, 2, 3)) + targets.sum((1, 2, 3))
            scores += (2 * inter / total.clamp(min=1)).tolist()
    return float(np.mean(scores))


def finetune(
    model,
    spec: ModelSpec | str,
    slices: list[TrainingSlice],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    base_sha256: str = "",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train the decoder of ``model`` (built from the base checkpoint) on ``slices``.

    Only the trained parameters change (the model ends with the best epoch's); with
    ``checkpoint_path`` a checkpoint is written after every epoch, and ``resume`` continues
    from it (same settings and slices).
    """
    import torch

    spec = get_spec(spec)
    config.check()
    if not slices:
        raise InputError("No training slices: the labels hold no target.")
    names = trained_names(model, config.train_prompt_encoder)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([parameters[n] for n in names], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    train, validation = split_slices(slices, config.validation_fraction, config.seed)
    padding = float(spec.box_padding)
    steps_per_epoch = int(np.ceil(len(train) / config.batch_size))

    def train_epoch(epoch: int) -> Iterator[float]:
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train))
        for step in range(steps_per_epoch):
            batch = [train[i] for i in order[step * config.batch_size: (step + 1) * config.batch_size]]
            logits, iou = decode(model, batch, model_boxes(batch, padding, config.box_jitter_px, rng),
                                 config.train_prompt_encoder)
            targets = torch.stack([s.target for s in batch]).to(logits.device)
            loss = segmentation_loss(logits, targets, iou, config.iou_loss_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            yield float(loss.detach())

    model.eval()  # no dropout / batch norm in SAM's decoder; eval keeps the frozen encoder as it is
    result = run_epochs(
        model, names, optimizer, config, train_epoch=train_epoch,
        validate=(lambda: validation_dice(model, validation, padding)) if validation else None,
        steps_per_epoch=steps_per_epoch, kind=CHECKPOINT, base_sha256=base_sha256,
        checkpoint_path=checkpoint_path, resume=resume, progress=progress,
    )
    result.metadata = {
        "base_model": spec.name, "family": spec.family, "base_sha256": base_sha256,
        "trained": sorted({n.split(".")[0] for n in names}), "settings": asdict(config),
        "validation_dice": result.validation_dice, "validation_dice_base": result.validation_dice_base,
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "training_slices": len(train), "validation_slices": len(validation),
        "cases": sorted({s.case for s in slices}), "training_seconds": round(result.seconds, 1),
    }
    return result


def write_adapter(path: str | Path, result: FinetuneResult) -> Path:
    """The adapter file of a fine-tuning: its trained tensors and metadata."""
    return save_adapter(path, result.state, result.metadata)

