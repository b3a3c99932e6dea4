"""Fine-tune LiteMedSAM's decoder on some volumes, measure on volumes it was not trained on.

Per test target: 3D Dice (and NSD) of the sliding-window engine from the simulated user's box on
the target's largest slice with the default stop rule (as ``litemedsam_stop_sweep.py verify``),
with the base weights and with the adapter; and the 2D slice Dice with the label's box on every
slice of the target. One session per test volume serves both (the frozen encoder's embeddings are
the same; only the decoder's tensors change). Prints training time, adapter size and the figures.

    OMP_NUM_THREADS=1 python benchmarks/litemedsam_finetune.py \
        --train mr_brats_pat0001:whole_tumour --test mr_brats_pat0005:whole_tumour --minutes 12
    # leave-one-out over the CT lesions
    OMP_NUM_THREADS=1 python benchmarks/litemedsam_finetune.py --loo \
        ct_lesion_000001:lesion ct_lesion_000002:lesion ct_lesion_000010:lesion --minutes 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from SAM3DSegmentLib.data.prompts import SlicePrompt  # noqa: E402
from SAM3DSegmentLib.data.volume import get_slice  # noqa: E402
from SAM3DSegmentLib.engines.sam_slice_predictor import open_sam_session  # noqa: E402
from SAM3DSegmentLib.engines.session import PropagationOptions  # noqa: E402
from SAM3DSegmentLib.evaluation.correction_rounds import user_seed  # noqa: E402
from SAM3DSegmentLib.evaluation.datasets import load_case, open_dataset, select_cases, target_mask  # noqa: E402
from SAM3DSegmentLib.evaluation.metrics import evaluate_masks  # noqa: E402
from SAM3DSegmentLib.evaluation.simulated_user import SimulatedUser, bounding_box  # noqa: E402
from SAM3DSegmentLib.models.adapters import read_adapter  # noqa: E402
from SAM3DSegmentLib.models.builders import build_model  # noqa: E402
from SAM3DSegmentLib.models.checkpoint_cache import recorded_sha256, resolve_checkpoint, sha256_of  # noqa: E402
from SAM3DSegmentLib.training.finetune import FinetuneConfig, finetune, write_adapter  # noqa: E402
from SAM3DSegmentLib.training.slices import prepare_slices  # noqa: E402

AXIS = 0


def _load(data: str, item: str):
    name, target = item.split(":")
    case = select_cases(open_dataset(data), [name])[0]
    volume, label = load_case(case)
    return case.name, target, volume, target_mask(case, label, target)


def _slice_dice(session, reference: np.ndarray) -> float:
    """Mean 2D Dice with the label's box on every slice of the target (the model's ceiling per slice)."""
    predictor = session.predictor
    scores = []
    for index in range(reference.shape[AXIS]):
        truth = get_slice(reference, AXIS, index)
        if truth.any():
            mask = predictor.predict(index, SlicePrompt(AXIS, index, box=bounding_box(truth))).mask
            scores.append(2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum()))
    return float(np.mean(scores))


def run(args, train: list[str], test: list[str], model, base_state: dict, sha: str) -> list[dict]:
    model.load_state_dict(base_state, strict=False)
    slices = []
    started = time.perf_counter()
    for item in train:
        name, _target, volume, reference = _load(args.data, item)
        slices += prepare_slices(model, "litemedsam", volume, reference, name=name, axis=AXIS, device="cpu",
                                 cache_dir=args.cache, base_sha256=sha)
    encode_s = time.perf_counter() - started
    config = FinetuneConfig(epochs=args.epochs, max_minutes=args.minutes, learning_rate=args.lr,
                            train_prompt_encoder=args.prompt_encoder, patience=args.patience)
    result = finetune(model, "litemedsam", slices, config, base_sha256=sha)
    adapter = write_adapter(Path(args.out) / f"adapter_{'+'.join(i.split(':')[0] for i in train)}.pt", result)
    print(f"\n## train on {', '.join(train)}: {len(slices)} slices (encoding {encode_s:.0f} s, or cached), "
          f"training {result.seconds:.0f} s, {result.metadata['epochs_run']} epochs, best {result.best_epoch} "
          f"({result.stopped}); validation Dice {result.validation_dice_base:.3f} -> {result.validation_dice:.3f}; "
          f"adapter {adapter.stat().st_size / 1e6:.2f} MB ({adapter})", flush=True)
    for record in result.history:
        print(f"  epoch {record.epoch}: loss {record.train_loss:.4f}, validation Dice {record.validation_dice:.4f}, "
              f"{record.seconds:.0f} s")
    _metadata, adapter_state = read_adapter(adapter)
    rows = []
    for item in test:
        name, target, volume, reference = _load(args.data, item)
        prompt = SimulatedUser("box", 0.0, user_seed(0, name, target)).initial_prompt(reference, AXIS, volume.spacing_kji)
        session = open_sam_session(volume, AXIS, model, "litemedsam", device="cpu")
        row = {"case": name, "target": target}
        for object_id, (label, state) in enumerate((("base", base_state), ("adapter", adapter_state)), start=1):
            model.load_state_dict(state, strict=False)
            session.add_prompt(object_id, prompt)
            result3d = session.propagate(object_id, PropagationOptions())
            m = evaluate_masks(result3d.mask, reference, volume.spacing_kji)
            row[f"{label}_dice"], row[f"{label}_nsd"] = m.dice, m.nsd
            row[f"{label}_slice_dice"] = _slice_dice(session, reference) if args.slice_dice else float("nan")
        session.close()
        rows.append(row)
        print(f"| {name} | {target} | {row['base_dice']:.3f} | {row['adapter_dice']:.3f} | "
              f"{row['adapter_dice'] - row['base_dice']:+.3f} | {row['base_nsd']:.3f} | {row['adapter_nsd']:.3f} | "
              f"{row['base_slice_dice']:.3f} | {row['adapter_slice_dice']:.3f} |", flush=True)
    model.load_state_dict(base_state, strict=False)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--train", nargs="*", default=["mr_brats_pat0001:whole_tumour"], metavar="CASE:TARGET")
    parser.add_argument("--test", nargs="*", default=["mr_brats_pat0005:whole_tumour"], metavar="CASE:TARGET")
    parser.add_argument("--loo", nargs="*", metavar="CASE:TARGET", help="leave-one-out over these (instead of --train/--test)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time limit per fine-tuning")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompt-encoder", action="store_true", help="train the prompt encoder too")
    parser.add_argument("--no-slice-dice", dest="slice_dice", action="store_false")
    parser.add_argument("--cache", default="/tmp/sam3d_finetune_cache", help="embedding cache folder")
    parser.add_argument("--out", default="/tmp/sam3d_finetune_bench")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    path = resolve_checkpoint("litemedsam")
    sha = recorded_sha256(Path(path)) or sha256_of(Path(path))
    model = build_model("litemedsam", path, "cpu")
    base_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("mask_decoder.", "prompt_encoder."))}
    splits = ([([x for x in args.loo if x != held], [held]) for held in args.loo] if args.loo
              else [(args.train, args.test)])
    rows = []
    for train, test in splits:
        print("\n| test case | target | 3D Dice base | 3D Dice adapter | change | NSD base | NSD adapter | "
              "slice Dice base | slice Dice adapter |\n|---|---|---|---|---|---|---|---|---|")
        rows += run(args, train, test, model, base_state, sha)
    change = np.mean([r["adapter_dice"] - r["base_dice"] for r in rows])
    print(f"\nmean 3D Dice {np.mean([r['base_dice'] for r in rows]):.3f} -> {np.mean([r['adapter_dice'] for r in rows]):.3f} "
          f"({change:+.3f}) over {len(rows)} test targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
