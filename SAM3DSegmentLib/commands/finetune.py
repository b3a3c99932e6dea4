"""``sam3d finetune``: train LiteMedSAM's mask decoder (default) or, with ``--engine volumetric``,
a 3DSAM-adapter checkpoint's adapters on the user's volumes; save an adapter file."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .progress import TextProgress

if TYPE_CHECKING:
    import numpy as np

    from ..data.volume import Volume

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune LiteMedSAM's decoder (or 3DSAM-adapter's adapters) on your volumes and labels, save an adapter",
        description=(
            "Fine-tune a model on your own volumes and corrected labels (a cases.json or a folder of "
            "image/label pairs, as `sam3d eval --data` reads them). The base weights stay frozen: the "
            "mask decoder (and with --prompt-encoder the prompt encoder) is trained on the slices holding "
            "each target, prompted with boxes from the label. The frozen encoder's embeddings are computed "
            "once (cached in --work-dir). A validation split stops early; a checkpoint after each epoch "
            "lets --resume continue. Writes a small adapter file: use it with "
            "`sam3d segment/eval --model litemedsam --adapter FILE`. "
            "With --engine volumetric --model 3dsam_adapter_NAME (or --checkpoint FILE --dataset NAME), a 3DSAM-adapter checkpoint is "
            "fine-tuned instead: its ViT frozen, its adapters, click encoder and 3D decoder trained on "
            "crops around each target (no caching possible: slow on a CPU). See docs/finetune.md."
        ),
    )
    parser.add_argument("--engine", default="slicewise", choices=("slicewise", "volumetric"),
                        help="slicewise: LiteMedSAM's decoder (default); volumetric: a 3DSAM-adapter checkpoint")
    parser.add_argument("--data", required=True, help="cases.json, a folder holding one, or a folder of pairs")
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--targets", nargs="*", help="structure names or groups (default: each case's targets)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the adapter file to write (.pt)")
    parser.add_argument("--model", default="litemedsam",
                        help="base model: litemedsam, or with --engine volumetric a 3dsam_adapter_* model")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="the base checkpoint file instead of the installed / cached one (volumetric: "
                             "the authors' last.pth.tar)")
    parser.add_argument("--dataset", choices=("kits", "lits", "pancreas", "colon"),
                        help="volumetric: the dataset the checkpoint was trained on (its intensity handling)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="slice axis (array k, j, i)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="slices per step (slicewise)")
    parser.add_argument("--lr", type=float, help="learning rate (AdamW; default 1e-4, volumetric 4e-4)")
    parser.add_argument("--patience", type=int, default=3, help="epochs without a better validation Dice before stopping")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="fraction of the slices held out")
    parser.add_argument("--box-jitter", type=float, default=5.0, help="box side jitter in model pixels (256 px frame)")
    parser.add_argument("--prompt-encoder", action="store_true", help="train the prompt encoder too (slicewise)")
    parser.add_argument("--crops-per-case", type=int, default=4, help="volumetric: training crops per target and epoch")
    parser.add_argument("--clicks", type=int, default=3, help="volumetric: up to this many clicks per training crop")
    parser.add_argument("--no-recompute", action="store_true",
                        help="volumetric: keep all encoder activations (about a quarter faster, about 20 GB more memory at full size)")
    parser.add_argument("--max-minutes", type=float, help="stop after this much training time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", metavar="DIR", help="embedding cache and training checkpoint (default: OUT.work)")
    parser.add_argument("--resume", action="store_true", help="continue from the training checkpoint in --work-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


class TrainingProgress(TextProgress):
    """The training's progress bar, with what is being done."""

    def __call__(self, done: int, total: int, what: str) -> None:
        self.show(done, total, what, finished=done >= total)


def training_targets(args: argparse.Namespace) -> Iterator[tuple[str, Volume, np.ndarray]]:
    """(case_target name, volume, target mask) of each target of the chosen cases, read as they are
    used; an empty target is skipped with a warning."""
    from ..evaluation.datasets import case_targets, load_case, open_dataset, select_cases, target_mask

    for case in select_cases(open_dataset(args.data), args.cases):
        volume, label = load_case(case)
        for target in case_targets(case, label, args.targets):
            reference = target_mask(case, label, target)
            if not reference.any():
                log.warning("%s: %s is empty, skipped.", case.name, target)
                continue
            yield f"{case.name}_{target}", volume, reference


def run(args: argparse.Namespace) -> int:
    if args.engine == "volumetric":
        return run_volumetric(args)
    from pathlib import Path

    from ..engines.choice import choose_engine
    from ..errors import InputError
    from ..models.builders import build_model
    from ..models.checkpoint_cache import recorded_sha256, sha256_of
    from ..training.finetune import FinetuneConfig, finetune, write_adapter
    from ..training.slices import prepare_slices

    choice = choose_engine("slicewise", args.model, args.checkpoint)
    if choice.spec.family != "litemedsam":
        raise InputError(f"Fine-tuning is implemented for LiteMedSAM; {choice.spec.name} is a {choice.spec.family} model.")
    config = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=1e-4 if args.lr is None else args.lr,
        train_prompt_encoder=args.prompt_encoder, validation_fraction=args.validation_fraction,
        patience=args.patience, box_jitter_px=args.box_jitter, max_minutes=args.max_minutes, seed=args.seed,
    )
    config.check()
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    progress = None if args.no_progress else TrainingProgress()
    sha = recorded_sha256(choice.checkpoint_path) or sha256_of(choice.checkpoint_path)
    model = build_model(choice.spec, choice.checkpoint_path, args.device)
    slices = []
    for name, volume, reference in training_targets(args):
        slices += prepare_slices(model, choice.spec, volume, reference, name=name, axis=args.axis,
                                 device=args.device, cache_dir=work / "embeddings", base_sha256=sha,
                                 progress=progress)
    if not slices:
        raise InputError(f"No target found in {args.data}: check --cases/--targets.")
    print(f"{len(slices)} training slices from {len({s.case for s in slices})} targets")
    result = finetune(model, choice.spec, slices, config, base_sha256=sha, checkpoint_path=work / "checkpoint.pt",
                      resume=args.resume, progress=progress)
    write_adapter(out, result)
    print(f"validation Dice {result.validation_dice_base:.3f} (base) -> {result.validation_dice:.3f} "
          f"(epoch {result.best_epoch}; {result.stopped}); {result.seconds:.0f} s")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): "
          f"sam3d segment --model {choice.spec.name} --adapter {out} ...")
    return 0


def run_volumetric(args: argparse.Namespace) -> int:
    """``--engine volumetric``: fine-tune a 3DSAM-adapter checkpoint file (``--checkpoint``, ``--dataset``)."""
    from pathlib import Path

    from ..errors import InputError
    from ..models.checkpoint_cache import recorded_sha256, sha256_of
    from ..models.devices import select_device
    from ..engines.choice import choose_engine
    from ..models.builders import build_model
    from ..training.finetune import write_adapter
    from ..training.volumetric_finetune import VolumetricFinetuneConfig, finetune_volumetric, prepare_case

    named = None if args.model == "litemedsam" else args.model  # litemedsam: the option's default
    if named is None and not (args.checkpoint and args.dataset):
        raise InputError(
            "--engine volumetric needs --model (3dsam_adapter_kits, _lits, _pancreas or _colon, see `sam3d models "
            "list`) or --checkpoint FILE (one of the authors' last.pth.tar files, see docs/volumetric.md) with "
            "--dataset (kits, lits, pancreas or colon: the one it was trained on)."
        )
    choice = choose_engine("volumetric", named or f"3dsam_adapter_{args.dataset}", args.checkpoint)
    if args.dataset and args.dataset != choice.spec.dataset:
        raise InputError(f"{choice.spec.name} was trained on {choice.spec.dataset}, not {args.dataset}: "
                         "drop --dataset or give the matching --model.")
    args.dataset = choice.spec.dataset
    config = VolumetricFinetuneConfig(
        dataset=args.dataset, epochs=args.epochs, crops_per_case=args.crops_per_case,
        learning_rate=4e-4 if args.lr is None else args.lr, max_clicks=args.clicks,
        validation_fraction=args.validation_fraction, patience=args.patience,
        recompute_blocks=not args.no_recompute, max_minutes=args.max_minutes, seed=args.seed,
    )
    config.check()
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    progress = None if args.no_progress else TrainingProgress()
    path = Path(choice.checkpoint_path)
    device = select_device(args.device)
    model = build_model(choice.spec, path, device)  # sized as the file's tensors say
    sha = recorded_sha256(path) or sha256_of(path)
    cases = [prepare_case(volume, reference, config, model.cfg.crop_size, name=name)
             for name, volume, reference in training_targets(args)]
    if not cases:
        raise InputError(f"No target found in {args.data}: check --cases/--targets.")
    print(f"{len(cases)} training targets; {config.crops_per_case} crops of {model.cfg.crop_size}^3 each per epoch")
    result = finetune_volumetric(model, cases, config, base_sha256=sha, checkpoint_path=work / "checkpoint.pt",
                                 resume=args.resume, progress=progress, device=device)
    write_adapter(out, result)
    print(f"validation Dice ({result.metadata['validation']}) {result.validation_dice_base:.3f} (base) -> "
          f"{result.validation_dice:.3f} (epoch {result.best_epoch}; {result.stopped}); {result.seconds:.0f} s")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); use it with: sam3d segment --engine volumetric "
          f"--model {choice.spec.name} --checkpoint {path} --adapter {out} ...")
    return 0
