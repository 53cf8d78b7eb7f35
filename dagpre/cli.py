"""The ``dagpre`` command: ``simulate``, ``run WORKFLOW``, ``info STORE``, ``demo``, ``export``.

Errors that dagpre raises on purpose
(:class:`~dagpre.types.DagpreError`) are printed as one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dagpre._version import __version__
from dagpre.types import DagpreError, InputError

BAD_FRAME_KINDS = ("cloud", "shutter", "defocus", "trailing")


def _parse_bad_frames(text: str) -> dict[int, str]:
    """``"2:cloud,4:trailing"`` -> ``{2: "cloud", 4: "trailing"}``."""
    result: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        index, sep, kind = item.partition(":")
        if not sep or not index.strip().isdigit() or kind.strip() not in BAD_FRAME_KINDS:
            raise argparse.ArgumentTypeError(
                f"expected INDEX:KIND pairs with KIND in {', '.join(BAD_FRAME_KINDS)} "
                f"(e.g. 2:cloud,4:trailing), got {item!r}"
            )
        result[int(index)] = kind.strip()
    return result


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dagpre",
        description="Astronomical frames to AI-ready products on NumPy or CuPy.",
    )
    parser.add_argument("--version", action="version", version=f"dagpre {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = commands.add_parser(
        "simulate",
        help="write a simulated night (FITS frames + ECSV truth tables)",
        description="Write a deterministic simulated night of one field: FITS frames with "
        "TAN (optionally SIP) WCS, and truth tables of stars, transients and frame conditions.",
    )
    sim.add_argument("outdir", type=Path, help="folder to write into (created if missing)")
    sim.add_argument("--frames", type=_positive_int, default=5, help="number of frames (5)")
    sim.add_argument("--size", type=_positive_int, default=512, help="frame side in pixels (512)")
    sim.add_argument("--stars", type=_positive_int, default=500, help="number of stars (500)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sim.add_argument("--psf", choices=("moffat", "gaussian"), default="moffat")
    sim.add_argument("--sip", action="store_true", help="add SIP camera distortion to the WCS")
    sim.add_argument("--transients", type=int, default=3, help="number of transients (3)")
    sim.add_argument(
        "--bad",
        type=_parse_bad_frames,
        default={},
        metavar="INDEX:KIND,...",
        help=f"bad frames, KIND in {', '.join(BAD_FRAME_KINDS)} (e.g. 2:cloud,4:trailing)",
    )
    sim.add_argument("--overwrite", action="store_true", help="replace existing files")
    sim.set_defaults(handler=_cmd_simulate)

    run = commands.add_parser(
        "run",
        help="run a workflow (YAML) on a cluster into its Zarr store",
        description="Run a workflow: frames -> Dask graph -> Zarr store. An existing store "
        "is resumed (frames already done are skipped) unless store.overwrite is true.",
    )
    run.add_argument("workflow", type=Path, help="the workflow file (see workflows/)")
    run.add_argument("--scheduler", metavar="ADDR", help="a running scheduler's address")
    run.set_defaults(handler=_cmd_run)

    info = commands.add_parser("info", help="summarise a dagpre store")
    info.add_argument("store", type=Path, help="the store folder (.zarr)")
    info.set_defaults(handler=_cmd_info)

    demo = commands.add_parser(
        "demo",
        help="simulate a small night and run workflows/demo.yaml on it",
        description="The main job on built-in data: simulate a night (variable stars, "
        "transients), run the demo workflow on a local cluster, print a summary checked "
        "against the simulator's truth, and write quicklook PNGs.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("dagpre-demo"), help="(dagpre-demo)")
    demo.add_argument("--frames", type=_positive_int, default=20, help="frames (20)")
    demo.add_argument("--size", type=_positive_int, default=1024, help="frame side (1024)")
    demo.add_argument("--stars", type=_positive_int, default=2000, help="stars (2000)")
    demo.add_argument("--workers", type=_positive_int, default=2, help="local workers (2)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.set_defaults(handler=_cmd_demo)

    export = commands.add_parser(
        "export",
        help="export a store's training set: cut-out triplets, light curves, labels",
        description="Cut science/reference/difference triplets around every candidate and a "
        "sample of reference sources, with light curves and (for a simulated night) labels "
        "from the truth, into a Zarr group that dagpre.ml.CutoutDataset reads. With "
        "--workflow, run that workflow first and export its store: dagpre export --workflow "
        "workflows/training_set.yaml --workdir NIGHT OUT.",
    )
    export.add_argument(
        "paths", nargs="+", type=Path, metavar="[STORE] OUT",
        help="the store and the training-set folder to write (only OUT with --workflow)",
    )  # fmt: skip
    export.add_argument("--size", type=_positive_int, default=None, help="cut-out side (63)")
    export.add_argument(
        "--normalise", choices=("none", "zscale", "robust"), default=None,
        help="per cut-out, per channel (robust: (x - median) / sigma)",
    )  # fmt: skip
    export.add_argument(
        "--n-sources", type=int, default=None, metavar="N",
        help="reference sources to cut around, drawn at random (1000; -1 for all)",
    )  # fmt: skip
    export.add_argument("--seed", type=int, default=None, help="seed of that draw (0)")
    export.add_argument("--chunk", type=_positive_int, default=None, help="rows per chunk (256)")
    export.add_argument("--truth", type=Path, help="truth folder (default: beside the frames)")
    export.add_argument("--no-candidates", action="store_true", help="no candidate cut-outs")
    export.add_argument("--no-lightcurves", action="store_true", help="no light curves")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument("--workflow", type=Path, help="run this workflow, then export its store")
    export.add_argument(
        "--workdir", type=Path,
        help="with --workflow: take its relative paths from here (default: the file's folder)",
    )  # fmt: skip
    export.add_argument("--workers", type=_positive_int, help="with --workflow: local workers")
    export.set_defaults(handler=_cmd_export)
    return parser


def _progress(text: str) -> None:
    print(f"  {text}", flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from dagpre.pipeline.run import run_workflow
    from dagpre.pipeline.workflow import load_workflow

    workflow = load_workflow(args.workflow)
    summary = run_workflow(workflow, scheduler=args.scheduler, progress=_progress)
    print(_summary_text(summary))
    return 0 if summary.rows or summary.skipped else 1


def _summary_text(summary) -> str:
    n = len(summary.rows)
    per = summary.seconds / n if n else float("nan")
    lines = [
        f"frames: {summary.done} done, {len(summary.failed)} failed, {summary.skipped} "
        f"already done; {summary.seconds:.1f} s ({per:.2f} s per frame computed)",
    ]
    lines += [f"  failed {r['path']}: {r['error']}" for r in summary.failed]
    lines += [f"  left out: {k}: {v}" for k, v in summary.missing_steps.items()]
    lines += [f"store: {s}" for s in summary.stores]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from dagpre.io import store as zs

    root = zs.open_store(args.store, mode="r")
    status = zs.frame_status(root)
    print(f"{args.store}: dagpre {root.attrs['dagpre_version']}, {status.size} frames")
    for name in ("pending", "done", "failed"):
        print(f"  {name}: {int((status == name).sum())}")
    errors = np.asarray(root["frames"]["error"][:].tolist(), dtype=str)
    paths = np.asarray(root["frames"]["path"][:].tolist(), dtype=str)
    for path, err in zip(paths[status == "failed"], errors[status == "failed"], strict=True):
        print(f"    {path}: {err}")
    for name in ("aligned", "difference", "variance", "mask"):
        if name in root:
            print(f"  {name}: {root[name].shape} {root[name].dtype}")
    if "reference" in root:
        n_src = root["reference"]["sources"]["x"].shape[0]
        print(
            f"  reference: {root['reference']['image'].shape}, {n_src} sources, from "
            f"{len(root.attrs['reference_frames'])} frame(s)"
        )
    for line in _tables_summary(root):
        print(f"  {line}")
    return 0


def _tables_summary(root) -> list[str]:
    """Lines on the frames' quality, the reference, light curves and candidates of a store."""
    import numpy as np

    lines = []
    frames = root["frames"]
    if "fwhm" in frames:
        fwhm = frames["fwhm"][:]
        if np.isfinite(fwhm).any():
            lines.append(
                f"quality: FWHM {np.nanmin(fwhm):.2f}-{np.nanmax(fwhm):.2f} px (median "
                f"{np.nanmedian(fwhm):.2f}), {int(np.sum(frames['nonuniformity'][:] > 0.05))}"
                " frame(s) with a non-uniform sky"
            )
    if "reference" in root:
        ref = root["reference"]
        notes = root.attrs.get("reference_notes", [])
        psf = "a PSF model" if "psf_model" in ref else "no PSF model"
        lines.append(f"reference noise {float(root.attrs.get('reference_noise', np.nan)):.2f}"
                     f" ADU, {psf}" + (f" ({'; '.join(notes)})" if notes else ""))  # fmt: skip
    if "lightcurves" in root:
        lc = root["lightcurves"]
        flux = lc["flux"][:]
        lines.append(f"lightcurves: {flux.shape} (source, frame), "
                     f"{int(np.isfinite(flux).sum())} points measured, planes "
                     f"{', '.join(sorted(lc.array_keys()))}")  # fmt: skip
        src = root["reference"]["sources"]
        if "variable" in src:
            var = src["variable"][:]
            chi = src["chi2_dof"][:]
            lines.append(f"variability: {int(var.sum())} of {var.size} sources flagged "
                         f"variable; median chi2/dof {np.nanmedian(chi):.2f}")  # fmt: skip
    if "candidates" in root:
        cand = root["candidates"]
        n = cand["id"].shape[0] if "id" in cand else 0
        if n:
            on = int(cand["on_source"][:].sum())
            res = int(cand["residual"][:].sum()) if "residual" in cand else 0
            snr = np.abs(cand["snr"][:])
            lines.append(f"candidates: {n} ({n - on} not on a reference source, {res} "
                         f"bright-star residuals), peak |S/N| up to {snr.max():.1f}")  # fmt: skip
        else:
            lines.append("candidates: none")
    return lines


def _cmd_demo(args: argparse.Namespace) -> int:
    from dagpre.pipeline.demo import run_demo

    return run_demo(
        args.workdir, n_frames=args.frames, size=args.size, n_stars=args.stars,
        n_workers=args.workers, seed=args.seed, say=_progress,
    )  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from dagpre.ml.dataset import export_training_set

    settings: dict = {}
    if args.workflow is not None:
        from dagpre.pipeline.run import run_workflow
        from dagpre.pipeline.workflow import load_workflow, parse_workflow

        if len(args.paths) != 1:
            raise InputError(
                "export", "with --workflow give OUT only (the store is the workflow's)"
            )
        workflow = load_workflow(args.workflow)
        if args.workdir is not None:
            workflow = parse_workflow(workflow.text, str(args.workflow), base_dir=args.workdir)
        if args.workers is not None:
            cluster = {**workflow.cluster, "n_workers": args.workers}
            workflow = dataclasses.replace(workflow, cluster=cluster)
        settings = dict(getattr(workflow, "export", None) or {})  # an export: section, if any
        summary = run_workflow(workflow, progress=_progress)
        print(_summary_text(summary))
        if len(summary.stores) != 1:
            raise InputError(str(args.workflow), f"made {len(summary.stores)} stores; export "
                             "each with dagpre export STORE OUT")  # fmt: skip
        store, out = Path(summary.stores[0]), args.paths[0]
    elif len(args.paths) == 2:
        store, out = args.paths
    else:
        raise InputError("export", "expected STORE OUT (or --workflow WORKFLOW OUT)")
    for key in ("size", "normalise", "seed", "chunk"):  # given on the command line: wins
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.n_sources is not None:
        settings["n_sources"] = None if args.n_sources < 0 else args.n_sources
    done = export_training_set(
        store, out, truth=args.truth, candidates=not args.no_candidates,
        lightcurves=not args.no_lightcurves, overwrite=args.overwrite, **settings,
    )  # fmt: skip
    labels = f"labels from {done.truth}" if done.labelled else "no truth found: labels are -1"
    print(
        f"dagpre export: {done.n_cutouts} cut-outs ({done.n_candidates} candidates, "
        f"{done.n_sources} sources), {done.n_lightcurves} light curves -> {done.path} "
        f"({done.seconds:.1f} s; {labels})"
    )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from dagpre import simulate

    for index in args.bad:
        if index >= args.frames:
            raise InputError("--bad", f"frame index {index} is beyond --frames {args.frames}")
    night = simulate.night(
        n_frames=args.frames,
        shape=(args.size, args.size),
        n_stars=args.stars,
        seed=args.seed,
        psf=args.psf,
        sip=args.sip,
        n_transients=args.transients,
        bad_frames=args.bad or None,
    )
    paths = night.write(args.outdir, overwrite=args.overwrite)
    table = night.frames_table
    print(
        f"dagpre simulate: {len(paths['frames'])} frames of {args.size}x{args.size} px, "
        f"{args.stars} stars, seed {args.seed} -> {args.outdir}"
    )
    for row, path in zip(table, paths["frames"], strict=True):
        bad = f"  bad: {row['bad']}" if row["bad"] else ""
        print(
            f"  {path}  mjd {row['mjd']:.5f}  seeing {row['seeing_fwhm']:.2f} px  "
            f"sky {row['sky']:.0f} ADU{bad}"
        )
    for path in paths["truth"]:
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dagpre`` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except DagpreError as exc:
        print(f"dagpre {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
