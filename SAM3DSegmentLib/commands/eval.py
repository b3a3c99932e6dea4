"""``sam3d eval``: run an engine over a dataset with a simulated user and report metrics."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an engine on a dataset with simulated clicks",
        description=(
            "Evaluate an engine on a cases.json dataset or a folder of image/label pairs. A seeded "
            "simulated user clicks (or boxes) the target's largest slice, then makes --rounds "
            "correction clicks. Dice, NSD and HD95 are computed on the whole volume. Writes "
            "results.csv, summary.md and a PNG montage per case and target into --out."
        ),
    )
    parser.add_argument("--data", required=True, help="cases.json, a folder holding one, or a folder of pairs")
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--targets", nargs="*", help="structure names or groups (default: each case's targets)")
    parser.add_argument("--engine", default=["auto"], nargs="+",
                        choices=("auto", "weightfree", "slicewise", "sam2", "volumetric", "oracle",
                                 "litemedsam-upstream", "litemedsam-oracle-box"),
                        help="engine; 'volumetric' is 3DSAM-adapter (with --model 3dsam_adapter_<task>; include "
                             "clicks only, so --prompt click and --rounds 0); 'oracle' is a measurement double "
                             "answering from the reference; "
                             "litemedsam-upstream is LiteMedSAM's published 3D pipeline (box on the middle slice "
                             "and the z-range from the reference), litemedsam-oracle-box a box from the reference "
                             "on every slice (the model's ceiling). Several engines run one after the other on "
                             "the same cases; results.csv and summary.md then hold them all, each engine's own "
                             "files go into a subfolder")
    parser.add_argument("--model", help="registered model name (see `sam3d models list`)")
    parser.add_argument("--checkpoint", help="local checkpoint file")
    parser.add_argument("--adapter", help="an adapter from `sam3d finetune` on top of the model's weights")
    parser.add_argument("--server", metavar="URL",
                        help="run the engine on a `sam3d serve` server (the URL it printed) instead of in this process")
    parser.add_argument("--token-file", metavar="FILE", help="the server's token file (with --server)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--prompt", choices=("click", "box"), default="click")
    parser.add_argument("--box-jitter", type=float, default=0.0,
                        help="move each box side by up to this fraction of the box size (seeded)")
    parser.add_argument("--rounds", type=int, default=0, help="correction clicks after the first propagation")
    parser.add_argument("--corrections", choices=("click", "click+mask"), default="click",
                        help="click+mask: a correction on a slice that is not an anchor carries its current mask")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="propagation axis (array k, j, i)")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--projection", help="sliding-window projection (box, mask, box+mask, points, ...)")
    parser.add_argument("--min-area", type=int, help="stop rule: minimum mask area in pixels")
    parser.add_argument("--min-score", type=float, help="stop rule: minimum engine score (negative: off)")
    parser.add_argument("--min-stability", type=float, help="stop rule: minimum stability score (negative: off)")
    parser.add_argument("--min-overlap", type=float, help="stop rule: minimum Dice with the previous slice (negative: off)")
    parser.add_argument("--min-likeness", type=float,
                        help="stop rule: minimum fraction of the mask in the anchor's intensity range (negative: off)")
    parser.add_argument("--max-shift", type=float,
                        help="stop rule: largest distance of the mask's median intensity from the anchor's, in "
                             "interquartile ranges of the anchor's intensities (negative: off)")
    parser.add_argument("--patience", type=int, help="stop rule: absent slices in a row before stopping")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option, e.g. click_start=region_box, correction=box_update, "
                             "precision=float32, orientation=array (repeatable)")
    parser.add_argument("--sweep", action="store_true",
                        help="compare every projection x --sweep-min-area x --sweep-patience (first round); "
                             "writes sweep.md")
    parser.add_argument("--sweep-projections", nargs="*",
                        default=["box", "mask", "box+mask", "points", "points+mask", "point"])
    parser.add_argument("--sweep-min-area", nargs="*", type=int, default=[1, 10, 50])
    parser.add_argument("--sweep-patience", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--protocol", choices=("ours", "cvpr25"), default="ours",
                        help="ours: the simulated user above; cvpr25: the CVPR 2025 challenge's box + 5 clicks "
                             "on every class of each image, scored as the challenge scores them (DSC, NSD, AUCs, "
                             "90 s per class); writes cvpr25.csv, cvpr25_summary.md, cvpr25_dice.png and each "
                             "case's segs/all_segs .npz")
    parser.add_argument("--gts", help="cvpr25: folder of reference .npz (key gts) when --data is a folder of "
                                      "challenge .npz cases without their own gts")
    parser.add_argument("--no-z-range", action="store_true",
                        help="cvpr25: do not limit propagation to each box's slice range")
    parser.add_argument("--no-montage", action="store_true", help="skip the PNG montages")
    parser.add_argument("--out", default="sam3d-eval", help="output folder (default: ./sam3d-eval)")
    parser.set_defaults(run=run)


def parse_engine_options(items: list[str]) -> dict:
    """KEY=VALUE strings as engine options (numbers and true/false converted)."""
    from ..errors import InputError

    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--engine-option {item!r}: write KEY=VALUE, e.g. click_start=region_box.")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[key.replace("-", "_")] = value
    return options


def check_arguments(args: argparse.Namespace) -> None:
    """InputError for numbers out of range and an --out folder that cannot be written, before any work."""
    from ..data.volume_files import check_output_folder
    from ..errors import InputError

    if args.rounds < 0:
        raise InputError(f"--rounds {args.rounds}: give 0 or more correction rounds.")
    if not args.nsd_tolerance > 0:
        raise InputError(f"--nsd-tolerance {args.nsd_tolerance}: give a tolerance in mm above 0.")
    if not 0 <= args.box_jitter <= 1:
        raise InputError(f"--box-jitter {args.box_jitter}: give a fraction of the box size from 0 to 1.")
    check_output_folder(args.out, "the results (--out)")
    if "volumetric" in args.engine and (args.prompt == "box" or args.rounds > 0 or args.protocol == "cvpr25"):
        raise InputError("The volumetric engine (3DSAM-adapter) takes include clicks only: no box, and no exclude "
                         "click, which the simulated user's corrections and --protocol cvpr25 use. Run it with "
                         "--prompt click --rounds 0 (the default protocol).")
    if args.server and (args.protocol == "cvpr25" or args.sweep or len(args.engine) > 1 or args.engine[0] in (
            "oracle", "litemedsam-upstream", "litemedsam-oracle-box") or args.checkpoint or args.adapter
            or args.engine_option or args.projection):
        raise InputError("--server runs one engine of the server as it is configured: drop --protocol cvpr25, "
                         "--sweep, several or baseline engines, --checkpoint, --adapter and engine options, "
                         "or run without --server.")


def remote_session_factory(args: argparse.Namespace):
    """Opens each target's session on the --server (its engine, unless --engine / --model name one)."""
    from ..serving.client import open_remote_session

    def open_remote(config, volume, reference):
        return open_remote_session(args.server, volume, config.axis, token_file=args.token_file,
                                   engine=None if config.engine == "auto" else config.engine, model=config.model)
    return open_remote


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from ..engines.session import PropagationOptions, StopRule
    from ..evaluation.correction_rounds import (
        EvaluationConfig,
        evaluate_dataset,
        summarise,
        summary_table,
        write_csv,
    )
    from ..evaluation.datasets import open_dataset, select_cases

    check_arguments(args)
    stop = {}
    if args.min_area is not None:
        stop["min_area"] = args.min_area
    for name in ("min_score", "min_stability", "min_overlap", "min_likeness", "max_shift"):
        value = getattr(args, name)
        if value is not None:
            stop[name] = None if value < 0 else value
    if args.patience is not None:
        stop["patience"] = args.patience
    engine_options = parse_engine_options(args.engine_option)
    if args.projection:
        engine_options["projection"] = args.projection
    config = EvaluationConfig(
        engine=args.engine[0], model=args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
        prompt=args.prompt, box_jitter=args.box_jitter, corrections=args.corrections, rounds=args.rounds,
        seed=args.seed,
        axis=args.axis, nsd_tolerance_mm=args.nsd_tolerance,
        propagation=PropagationOptions(stop=StopRule(**stop)), engine_options=engine_options,
    )
    if args.protocol == "cvpr25":
        return run_cvpr25(args, config)
    cases = select_cases(open_dataset(args.data), args.cases)
    if args.sweep:
        return run_sweep(args, config, cases)
    if args.server:
        rows = evaluate_dataset(config, cases, args.targets, args.out, montage=not args.no_montage,
                                session_factory=remote_session_factory(args))
    elif len(args.engine) == 1:
        rows = evaluate_dataset(config, cases, args.targets, args.out, montage=not args.no_montage)
    else:
        rows = []
        for engine in args.engine:
            with_model = engine in ("auto", "slicewise", "sam2", "volumetric")  # --model and --engine-option are theirs
            engine_config = replace(config, engine=engine, model=args.model if with_model else None,
                                    engine_options=config.engine_options if with_model else {})
            rows += evaluate_dataset(engine_config, cases, args.targets,
                                     Path(args.out) / engine, montage=not args.no_montage)
        write_csv(rows, Path(args.out) / "results.csv")
        (Path(args.out) / "summary.md").write_text(summarise(rows, config), encoding="utf-8")
    print(summary_table(rows))
    print(f"wrote {args.out}/results.csv, {args.out}/summary.md" + ("" if args.no_montage else " and montages"))
    return 0


def run_sweep(args: argparse.Namespace, config, cases) -> int:
    from pathlib import Path

    from ..evaluation.correction_rounds import evaluate_sweep, sweep_grid, sweep_table

    settings = sweep_grid(args.sweep_projections, args.sweep_min_area, args.sweep_patience, config.propagation)
    results = evaluate_sweep(config, cases, settings, args.targets)
    table = sweep_table(results, {s.label: s.propagation.stop.patience for s in settings})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(
        f"# Sweep: engine {config.engine}, {args.prompt} prompt, seed {args.seed}, first propagation\n\n"
        f"Whole-volume Dice, NSD at {args.nsd_tolerance:g} mm, HD95; best mean Dice first.\n\n{table}",
        encoding="utf-8",
    )
    print(table)
    print(f"wrote {out}/sweep.md")
    return 0


def run_cvpr25(args: argparse.Namespace, config) -> int:
    """The CVPR 2025 challenge's protocol for each engine; one CSV, summary and plot for all."""
    from dataclasses import replace
    from pathlib import Path

    from ..errors import InputError
    from ..evaluation import cvpr25
    from ..evaluation.cvpr25_files import images_from_cases, is_challenge_folder, read_challenge_folder
    from ..evaluation.datasets import open_dataset, select_cases

    unsupported = [e for e in args.engine if e.startswith("litemedsam-")]
    if unsupported or args.sweep:
        raise InputError(f"--protocol cvpr25 runs the engines (weightfree, slicewise, sam2, auto, oracle); "
                         f"not {', '.join(unsupported) or '--sweep'}.")
    challenge = is_challenge_folder(args.data)
    if args.gts and not challenge:
        raise InputError("--gts goes with --data pointing at a folder of challenge .npz cases.")

    def images():
        if challenge:
            return read_challenge_folder(args.data, args.gts, args.cases, args.axis)
        return images_from_cases(select_cases(open_dataset(args.data), args.cases), args.targets, args.axis, args.seed)

    out = Path(args.out)
    rows = []
    for engine in args.engine:
        with_model = engine in ("auto", "slicewise", "sam2")
        engine_config = replace(config, engine=engine, model=args.model if with_model else None,
                                engine_options=config.engine_options if with_model else {})
        folder = out / engine if len(args.engine) > 1 else out
        rows += cvpr25.evaluate_images(engine_config, images(), folder, use_z_range=not args.no_z_range)
    if len(args.engine) > 1:
        cvpr25.write_csv(rows, out / "cvpr25.csv")
        (out / "cvpr25_summary.md").write_text(cvpr25.summarise(rows), encoding="utf-8")
        cvpr25.save_step_plot(rows, out / "cvpr25_dice.png")
    print(cvpr25.summary_table(rows))
    print(f"wrote {out}/cvpr25.csv, {out}/cvpr25_summary.md, {out}/cvpr25_dice.png and segs per case")
    return 0
