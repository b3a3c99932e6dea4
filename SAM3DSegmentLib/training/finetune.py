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

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..models.adapters import save_adapter
from ..models.registry import ModelSpec, get_spec
from .slices import Progress, TrainingSlice

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sam3d-finetune-checkpoint-1"


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


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    validation_dice: float
    seconds: float


@dataclass
class FinetuneResult:
    """What a fine-tuning produced: the best trained tensors and how it went."""

    state: dict
    metadata: dict
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    validation_dice_base: float = float("nan")
    validation_dice: float = float("nan")
    stopped: str = ""
    seconds: float = 0.0


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
    trained = [parameters[n] for n in names]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    train, validation = split_slices(slices, config.validation_fraction, config.seed)
    padding = float(spec.box_padding)

    def snapshot() -> dict:
        return {n: parameters[n].detach().clone() for n in names}

    model.eval()  # no dropout / batch norm in SAM's decoder; eval keeps the frozen encoder as it is
    base_dice = validation_dice(model, validation, padding)
    state = {"epoch": 0, "best_state": snapshot(), "best_dice": base_dice, "best_epoch": 0,
             "bad_epochs": 0, "history": [], "seconds": 0.0}
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = _load_checkpoint(checkpoint_path, config, base_sha256, names)
        model.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        log.info("Resuming from %s after epoch %d.", checkpoint_path, state["epoch"])
    steps_per_epoch = int(np.ceil(len(train) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    started = time.perf_counter() - state["seconds"]
    stopped = "all epochs done"
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if state["bad_epochs"] >= config.patience:
            stopped = f"early stop: no better validation Dice for {config.patience} epochs"
            break
        if config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes:
            stopped = f"time limit of {config.max_minutes:g} min"
            break
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train))
        losses = []
        epoch_started = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = [train[i] for i in order[step * config.batch_size: (step + 1) * config.batch_size]]
            logits, iou = decode(model, batch, model_boxes(batch, padding, config.box_jitter_px, rng),
                                 config.train_prompt_encoder)
            targets = torch.stack([s.target for s in batch]).to(logits.device)
            loss = segmentation_loss(logits, targets, iou, config.iou_loss_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress((epoch - 1) * steps_per_epoch + step + 1, total_steps,
                         f"epoch {epoch}/{config.epochs} loss {np.mean(losses):.3f}")
        dice = validation_dice(model, validation, padding) if validation else float("nan")
        record = EpochRecord(epoch, float(np.mean(losses)), dice, time.perf_counter() - epoch_started)
        state["history"].append(asdict(record))
        better = not validation or not dice <= state["best_dice"]  # no validation: the last epoch is kept
        if better:
            state.update(best_state=snapshot(), best_dice=dice, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["seconds"] = time.perf_counter() - started
        log.info("epoch %d: training loss %.4f, validation Dice %.4f", epoch, record.train_loss, dice)
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, state, snapshot(), optimizer, config, base_sha256)
    model.load_state_dict(state["best_state"], strict=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    seconds = time.perf_counter() - started
    metadata = {
        "base_model": spec.name, "family": spec.family, "base_sha256": base_sha256,
        "trained": sorted({n.split(".")[0] for n in names}), "settings": asdict(config),
        "validation_dice": state["best_dice"], "validation_dice_base": base_dice,
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "training_slices": len(train), "validation_slices": len(validation),
        "cases": sorted({s.case for s in slices}), "training_seconds": round(seconds, 1),
    }
    return FinetuneResult(
        state["best_state"], metadata, [EpochRecord(**h) for h in state["history"]], state["best_epoch"],
        base_dice, state["best_dice"], stopped, seconds,
    )


def write_adapter(path: str | Path, result: FinetuneResult) -> Path:
    """The adapter file of a fine-tuning: its trained tensors and metadata."""
    return save_adapter(path, result.state, result.metadata)


def _save_checkpoint(path, state: dict, current: dict, optimizer, config: FinetuneConfig, base_sha256: str) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "config": asdict(config), "base_sha256": base_sha256,
        "trained": current, "optimizer": optimizer.state_dict(),
        **{k: state[k] for k in ("epoch", "best_state", "best_dice", "best_epoch", "bad_epochs", "history", "seconds")},
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # a run killed while writing keeps the previous checkpoint


def _load_checkpoint(path, config: FinetuneConfig, base_sha256: str, names: list[str]) -> dict:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"Training checkpoint {path} cannot be read ({type(exc).__name__}); start again without --resume.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a `sam3d finetune` training checkpoint; start again without --resume.")
    if payload["base_sha256"] != base_sha256 or sorted(payload["trained"]) != sorted(names):
        raise CheckpointError(f"Training checkpoint {path} is from another base model or setting; start again without --resume.")
    if payload["config"] != asdict(config):
        log.warning("Resuming %s with other settings than it was started with.", path)
    return payload
