"""``sam3d bench``: speed and memory of an engine against the pipeline peers use, in one run."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time an engine against the peers' pipeline on a real volume",
        description=(
            "Same weights (LiteMedSAM's real ones; others random unless --checkpoint), same volume: our "
            "SAM 2 engine vs JPEG frames + SAM2VideoPredictor over every slice; our sliding-window "
            "engine with LiteMedSAM (the default) vs LiteMedSAM's published 3D pipeline given the z-range, "
            "or with SAM vs per-slice SamPredictor with box chaining over every slice. Prints slices "
            "encoded, wall-time ratios, overhead vs a bare encoder forward, re-propagation after a "
            "correction, preview latency and peak memory; medians over --repeats."
        ),
    )
    parser.add_argument("--engine", choices=("sam2", "slicewise"), required=True)
    parser.add_argument("--data", default="../shared/data", help="cases.json dataset (default ../shared/data)")
    parser.add_argument("--case", default="ct_upper_abdomen_totalseg")
    parser.add_argument("--target", default="kidney_left")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="registered model (default sam2.1_hiera_tiny / litemedsam)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: random initialisation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-slices", type=int, help="cut the volume to this many slices around the target")
    parser.add_argument("--stop", choices=("target-range", "rule"),
                        help="target-range: propagate over the target's slices +/- patience with the stop rule "
                             "off (random weights cannot judge the end); rule: the engine's stop rule "
                             "(default: rule with real weights, target-range with random ones)")
    parser.add_argument("--patience", type=int,
                        help="stop rule patience (default: the rule's own with --stop rule, 2 with target-range)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.benchmark import run_benchmark

    report = run_benchmark(
        args.engine, args.data, args.case, args.target, repeats=args.repeats, model_name=args.model,
        checkpoint=args.checkpoint, device=args.device, max_slices=args.max_slices, stop_mode=args.stop,
        patience=args.patience,
    )
    print("\n".join(report.lines()))
    return 0
