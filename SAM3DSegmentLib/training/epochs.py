"""The epoch loop both fine-tunings share (:mod:`.finetune`, :mod:`.volumetric_finetune`).

Each module gives one epoch's training steps and its validation; this loop keeps the best epoch
by validation Dice (the last one without validation), stops early after ``patience`` epochs
without a better Dice or at the time limit, reports progress, and writes a training checkpoint
after each epoch that ``resume`` continues from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .slices import Progress

log = logging.getLogger(__name__)

EPOCH_MESSAGE = "epoch {epoch}: training loss {train_loss:.4f}, validation Dice {validation_dice:.4f}"
"""The log line after each epoch, formatted with the fields of :class:`EpochRecord`."""


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


@dataclass(frozen=True)
class CheckpointKind:
    """Tells one fine-tuning's training checkpoints from another's, in the file and in its errors."""

    format: str
    command: str
    """The command that writes them, as the errors name it."""
    other: str
    """Where a checkpoint of other trained tensors comes from, as the errors say it."""


def run_epochs(
    model,
    names: list[str],
    optimizer,
    config: Any,
    *,
    train_epoch: Callable[[int], Iterable[float]],
    validate: Callable[[], float] | None,
    steps_per_epoch: int,
    kind: CheckpointKind,
    base_sha256: str,
    checkpoint_path: str | Path | None,
    resume: bool,
    progress: Progress | None,
    epoch_message: str = EPOCH_MESSAGE,
) -> FinetuneResult:
    """Train the parameters ``names`` of ``model`` for ``config.epochs`` epochs (``config``: the
    settings dataclass, with ``epochs``, ``patience`` and ``max_minutes``).

    ``train_epoch(epoch)`` runs that epoch's steps and yields each step's loss; ``validate()``
    gives the validation Dice (None: no validation, no early stop, the last epoch is kept).
    The model ends with the best epoch's tensors and nothing trainable. The result's metadata
    is left empty.
    """
    parameters = dict(model.named_parameters())

    def snapshot() -> dict:
        return {n: parameters[n].detach().clone() for n in names}

    base_dice = validate() if validate is not None else float("nan")
    state = {"epoch": 0, "best_state": snapshot(), "best_dice": base_dice, "best_epoch": 0,
             "bad_epochs": 0, "history": [], "seconds": 0.0}
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = _load_checkpoint(checkpoint_path, kind, config, base_sha256, names)
        model.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        log.info("Resuming from %s after epoch %d.", checkpoint_path, state["epoch"])
    total_steps = steps_per_epoch * config.epochs
    started = time.perf_counter() - state["seconds"]
    stopped = "all epochs done"
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if validate is not None and state["bad_epochs"] >= config.patience:
            stopped = f"early stop: no better validation Dice for {config.patience} epochs"
            break
        if config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes:
            stopped = f"time limit of {config.max_minutes:g} min"
            break
        losses = []
        epoch_started = time.perf_counter()
        for loss in train_epoch(epoch):
            losses.append(loss)
            if progress is not None:
                progress((epoch - 1) * steps_per_epoch + len(losses), total_steps,
                         f"epoch {epoch}/{config.epochs} loss {np.mean(losses):.3f}")
        dice = validate() if validate is not None else float("nan")
        record = asdict(EpochRecord(epoch, float(np.mean(losses)), dice, time.perf_counter() - epoch_started))
        state["history"].append(record)
        if validate is None or not dice <= state["best_dice"]:
            state.update(best_state=snapshot(), best_dice=dice, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["seconds"] = time.perf_counter() - started
        log.info(epoch_message.format(**record))
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, kind, state, snapshot(), optimizer, config, base_sha256)
    model.load_state_dict(state["best_state"], strict=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return FinetuneResult(
        state["best_state"], {}, [EpochRecord(**h) for h in state["history"]], state["best_epoch"],
        base_dice, state["best_dice"], stopped, time.perf_counter() - started,
    )


def _save_checkpoint(path, kind: CheckpointKind, state: dict, current: dict, optimizer, config: Any,
                     base_sha256: str) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": kind.format, "config": asdict(config), "base_sha256": base_sha256,
        "trained": {k: v.cpu() for k, v in current.items()}, "optimizer": optimizer.state_dict(),
        **{k: state[k] for k in ("epoch", "best_dice", "best_epoch", "bad_epochs", "history", "seconds")},
        "best_state": {k: v.cpu() for k, v in state["best_state"].items()},
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # a run killed while writing keeps the previous checkpoint


def _load_checkpoint(path, kind: CheckpointKind, config: Any, base_sha256: str, names: list[str]) -> dict:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"Training checkpoint {path} cannot be read ({type(exc).__name__}); start again without --resume.") from exc
    if not isinstance(payload, dict) or payload.get("format") != kind.format:
        raise CheckpointError(f"{path} is not a {kind.command} training checkpoint; start again without --resume.")
    if payload["base_sha256"] != base_sha256 or sorted(payload["trained"]) != sorted(names):
        raise CheckpointError(f"Training checkpoint {path} is from {kind.other}; start again without --resume.")
    if payload["config"] != asdict(config):
        log.warning("Resuming %s with other settings than it was started with.", path)
    return payload
