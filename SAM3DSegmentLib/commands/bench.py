"""``sam3d bench``: speed and memory of an engine against the pipeline peers use, in one run;
``sam3d bench --server``: a ``sam3d serve`` process under 1, 4, 16 simulated annotators
(:mod:`~SAM3DSegmentLib.serving.load_bench`)."""

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
            "correction, preview latency and peak memory; medians over --repeats. With --server: a sam3d serve "
            "process under --annotators simulated annotators (see docs/server.md, Benchmark)."
        ),
    )
    parser.add_argument("--engine", choices=("sam2", "slicewise", "weightfree", "volumetric"),
                        help="engine to benchmark: sam2 or slicewise (required without --server); with --server, "
                             "the server's engine (default: as `sam3d serve`, LiteMedSAM). volumetric "
                             "(3DSAM-adapter) has no peer pipeline here: time it with `sam3d eval`")
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
    server = parser.add_argument_group(
        "server load (--server)",
        "start a `sam3d serve` (or use --server-url) and run simulated annotators on --case/--target: each round "
        "opens a session on a new copy of the volume, clicks, propagates, clicks a correction, closes",
    )
    server.add_argument("--server", action="store_true", help="measure a server under simulated annotators")
    server.add_argument("--annotators", type=int, nargs="+", default=[1, 4, 16], metavar="N",
                        help="annotator counts, one phase each (default 1 4 16)")
    server.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                        help="length of each phase (default 60; a round under way finishes)")
    server.add_argument("--rounds", type=int, help="at most this many rounds per annotator and phase")
    server.add_argument("--overhead-repeats", type=int, default=3,
                        help="repeats of server vs in-process click + propagate (default 3; 0: skip)")
    server.add_argument("--server-url", help="use this running server instead of starting one")
    server.add_argument("--token-file", help="the running server's token file (tokens shared round robin)")
    server.add_argument("--server-pid", type=int, help="the running server's process id (to read its memory)")
    server.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..evaluation.benchmark import VOLUMETRIC_NOT_BENCHED, run_benchmark

    if args.engine == "volumetric":
        raise InputError(VOLUMETRIC_NOT_BENCHED)
    if args.server:
        return run_server(args)
    if args.engine not in ("sam2", "slicewise"):
        raise InputError("Give --engine sam2 or --engine slicewise (or --server to measure a server).")
    report = run_benchmark(
        args.engine, args.data, args.case, args.target, repeats=args.repeats, model_name=args.model,
        checkpoint=args.checkpoint, device=args.device, max_slices=args.max_slices, stop_mode=args.stop,
        patience=args.patience,
    )
    print("\n".join(report.lines()))
    return 0


def run_server(args: argparse.Namespace) -> int:
    """``--server``: the case's volume and a simulated user's clicks, then :func:`run_load_bench`."""
    from ..data.prompts import Point, SlicePrompt
    from ..data.volume import get_slice
    from ..evaluation.benchmark import load_bench_case
    from ..evaluation.simulated_user import SimulatedUser, interior_point, slice_areas, slice_spacing
    from ..serving.load_bench import Workload, run_load_bench

    axis = 0
    case, volume, reference, slab = load_bench_case(args.data, args.case, args.target, args.max_slices, axis)
    prompt = SimulatedUser("click").initial_prompt(reference, axis, volume.spacing_kji)
    present = slice_areas(reference, axis) > 0  # correction: the next slice of the target, encoded by the propagation
    index = next((i for i in (prompt.index + 1, prompt.index - 1) if 0 <= i < present.size and present[i]), None)
    correction = None
    if index is not None:
        row, col = interior_point(get_slice(reference, axis, index), slice_spacing(volume.spacing_kji, axis))
        correction = SlicePrompt(axis, index, points=(Point(row, col, True),))
    workload = Workload(volume, prompt, correction, axis=axis, label=f"{case.name} / {args.target}{slab}")
    report = run_load_bench(
        workload, args.annotators, args.duration, args.rounds, engine=args.engine or "auto", model=args.model,
        checkpoint=args.checkpoint, device=args.device, server_url=args.server_url, token_file=args.token_file,
        server_pid=args.server_pid, overhead_repeats=args.overhead_repeats,
    )
    print("\n".join(report.lines()))
    if args.json:
        report.write_json(args.json)
    return 0
