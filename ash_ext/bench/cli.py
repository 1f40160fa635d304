"""``python -m ash_ext bench``: the parser, the configuration it builds, and :func:`main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .._ops import extension_loaded
from ..cpu_dispatch import set_cpu_isa
from . import family
from .cases import DTYPE_ALIASES, DTYPES, SHAPES, VARIANTS, Case, best_device, canonical_variants, supported_dtypes
from .config import BenchConfig
from .contention import DEFAULT_WAIT_S
from .estimate import format_duration
from .files import write_csv, write_json
from .impls import IMPLEMENTATIONS, pytorch_ood_version
from .machine import cpu_model
from .plot import matplotlib_available, write_plot
from .report import format_table, summary_lines
from .runner import estimated_seconds, run


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def build_parser(prog: str = "ash-ext bench") -> argparse.ArgumentParser:
    """The ``bench`` subcommand's argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Time ash_ext against the reference algorithm (in place), pytorch-ood, the pure-PyTorch fallback and "
            "x.clone() (the memory roofline) on the shapes ASH is applied to; print a table, write results.json, "
            "results.csv and speedup.png."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            f"  {prog} --quick\n"
            f"  {prog} --shapes resnet50-l4 wrn28-10 --batches 1 64 --dtypes float16 --variants ash-s\n"
            f"  {prog} --device cpu --threads 1 --impls reference ash_ext clone --markdown\n"
            f"  {prog} --methods family --markdown --out family-out\n"
            "\nThe quick suite is float32, p=0.65, all variants, two batch sizes per shape. On a CPU the default\n"
            "suite runs batch 1 and one or two larger batches per shape, among them the README's targets\n"
            "[64, 2048, 7, 7] and [256, 2048] (the largest maps in float32 only), every variant at p=0.65 and\n"
            "0.9; a GPU runs 1..256 everywhere. Pick any with --batches. The forecast is printed before timing\n"
            "starts; the timing waits (--wait-quiet) while other processes keep the CPUs busy, as measured from\n"
            "/proc/stat. Results: OUT/results.json (every sample, the machine and versions),\n"
            "OUT/results.csv (one row per case) and OUT/speedup.png (needs matplotlib).\n"
            "\n--methods family compares SCALE, ReAct+ASH (clip=), LTS, topk_stats, per-sample percentiles and\n"
            "ReAct's fit with their references (pytorch-ood 0.4.0's functions, torch.topk, a torch.sort-based\n"
            "per-sample ASH-S, np.percentile) on their own shapes; --quick, --batches, --dtypes, --percentiles and\n"
            "--shapes apply to them too (LTS keeps p = 0.05, the fit 0.9). Alone they write OUT/results.json and\n"
            "OUT/results.csv; with ash (--methods all) OUT/family-results.json and OUT/family-results.csv."
        ),
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--shapes", nargs="+", metavar="NAME", help=f"shapes (comma or space separated): {', '.join(SHAPES)}; or all"
    )
    parser.add_argument("--batches", nargs="+", metavar="B", help="batch sizes (default: per shape and device)")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="V",
        help=f"{', '.join(VARIANTS)} (any case, '_' for '-', as in the API); or all (default: all)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        metavar="T",
        help="float32, float16, bfloat16, float64 (default: float32 and the device's half types)",
    )
    parser.add_argument("--percentiles", nargs="+", metavar="P", help="fractions pruned, in [0, 1] (default: 0.65 0.9)")
    parser.add_argument(
        "--impls", nargs="+", metavar="I", help=f"implementations to time: {', '.join(IMPLEMENTATIONS)}"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="what to compare with its reference: ash (the ASH variants; the default), scale, react-ash, lts, "
        "topk-stats, per-sample, react-fit (any case, '_' for '-'); family (all but ash) or all",
    )
    parser.add_argument("--quick", action="store_true", help="the short suite (seconds on a 2-core CPU)")
    parser.add_argument(
        "--out", default="bench-out", help="directory for results.json, results.csv, speedup.png (default: bench-out)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write speedup.png")
    parser.add_argument("--no-files", action="store_true", help="write nothing, only print the table")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input data (default: 0)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--min-time",
        type=float,
        help="seconds each implementation is timed per case (default 0.02 CPU / 0.05 GPU, /5 with --quick)",
    )
    parser.add_argument(
        "--min-reps", type=int, default=5, help="fewest timed calls per fast implementation and case (default: 5)"
    )
    parser.add_argument(
        "--max-reps", type=int, default=200, help="most timed calls per implementation and case (default: 200)"
    )
    parser.add_argument("--cache-mb", type=float, help="last-level cache size in MiB (default: read from the machine)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help="before timing, wait up to S seconds while other processes keep the CPUs busy, measured from "
        f"/proc/stat (default: {DEFAULT_WAIT_S:g}; 0: don't wait)",
    )
    parser.add_argument(
        "--cpu-isa",
        help="the CPU kernel's ISA build: auto, avx512, avx2 or baseline (default: ASH_EXT_CPU_ISA, else the best)",
    )
    return parser


def _parse_device(parser: argparse.ArgumentParser, text: str | None) -> torch.device:
    if text is None:
        return best_device()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device {text!r} is not a torch device ({error})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {text}: CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        parser.error(f"--device {text}: MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        parser.error(f"--device {text}: only cpu, cuda and mps are supported")
    return device


def parse_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed arguments ``args``; bad values exit through ``parser.error``."""
    device = _parse_device(parser, args.device)
    methods = None
    if args.methods is not None:
        try:
            methods = family.expand_methods(_split(args.methods) or [])
        except ValueError as error:
            parser.error(f"--methods: {error}")
        if not methods:
            parser.error("--methods: no method given")
    known_shapes = list(SHAPES)
    if methods is not None and any(m != "ash" for m in methods):
        known_shapes += [s for s in family.SHAPES if s not in SHAPES]
    shapes = _split(args.shapes)
    if shapes is not None:
        if shapes == ["all"]:
            shapes = list(known_shapes)
        unknown = [s for s in shapes if s not in known_shapes]
        if unknown:
            parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(known_shapes)}")
    batches = None
    if args.batches is not None:
        batches = []
        for text in _split(args.batches) or []:
            if not text.isdigit() or int(text) < 1:
                parser.error(f"--batches: {text!r} is not a positive integer")
            batches.append(int(text))
    variants = _split(args.variants)
    if variants is not None:
        try:
            variants = canonical_variants(variants)
        except ValueError as error:
            parser.error(f"--variants: {error}")
        if not variants:
            parser.error("--variants: no variant given")
    dtypes = _split(args.dtypes)
    if dtypes is not None:
        dtypes = [DTYPE_ALIASES.get(d.lower(), d.lower()) for d in dtypes]
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
        available = supported_dtypes(device) + ["float64"]
        missing = [d for d in dtypes if d not in available]
        if missing:
            parser.error(f"dtype(s) {', '.join(missing)} not supported on {device}")
    percentiles = None
    if args.percentiles is not None:
        percentiles = []
        for text in _split(args.percentiles) or []:
            try:
                value = float(text)
            except ValueError:
                parser.error(f"--percentiles: {text!r} is not a number")
            if not 0.0 <= value <= 1.0:
                hint = f" (did you mean {value / 100:g}?)" if 1 < value <= 100 else ""
                parser.error(f"--percentiles: {text} is not a fraction in [0, 1]{hint}")
            percentiles.append(value)
    impls = list(IMPLEMENTATIONS)
    if args.impls is not None:
        impls = _split(args.impls) or []
        unknown = [i for i in impls if i not in IMPLEMENTATIONS]
        if unknown:
            parser.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    for name, value in (("--threads", args.threads), ("--min-reps", args.min_reps), ("--max-reps", args.max_reps)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1")
    if args.min_reps > args.max_reps:
        parser.error("--min-reps is larger than --max-reps")
    if args.min_time is not None and not args.min_time > 0:
        parser.error("--min-time must be positive")
    if args.cache_mb is not None and not args.cache_mb > 0:
        parser.error("--cache-mb must be positive")
    if not args.wait_quiet >= 0:
        parser.error("--wait-quiet must be 0 or more")
    return BenchConfig(
        device=str(device),
        shapes=shapes,
        batches=batches,
        variants=variants,
        dtypes=dtypes,
        percentiles=percentiles,
        impls=impls,
        quick=args.quick,
        seed=args.seed,
        threads=args.threads,
        min_time=args.min_time,
        min_reps=args.min_reps,
        slow_min_reps=min(3, args.min_reps),
        max_reps=args.max_reps,
        cache_bytes=int(args.cache_mb * 2**20) if args.cache_mb else None,
        progress=not args.no_progress,
        methods=methods,
        wait_quiet_s=args.wait_quiet,
    )


def main(argv: Sequence[str] | None = None, prog: str = "ash-ext bench") -> int:
    """Run ``bench`` with command-line arguments ``argv``; returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.cpu_isa is not None:
        if not extension_loaded():
            parser.error("--cpu-isa: the extension is not built, so there is no CPU kernel")
        try:
            set_cpu_isa(args.cpu_isa)
        except ValueError as error:
            parser.error(f"--cpu-isa: {error}")
    config = parse_config(parser, args)
    cases = config.cases()
    family_cases = family.family_cases(config) if config.methods is not None else []
    if not cases and not family_cases:
        parser.error("the selection is empty")
    if not args.no_files:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as error:
            parser.error(f"--out {args.out}: {error}")
    device = config.resolved_device()
    where = (
        f" ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else f" ({cpu_model()}, {torch.get_num_threads() if not config.threads else config.threads} threads)"
    )
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    forecast = {
        "ash": estimated_seconds(config) if cases else 0.0,
        "family": family.estimated_seconds(config) if family_cases else 0.0,
    }
    if cases and family_cases:
        print(
            f"ash_ext bench: the timing will take about {format_duration(sum(forecast.values()))}: "
            f"{len(cases)} ASH cases (~{format_duration(forecast['ash'])}), then {len(family_cases)} family cases "
            f"(~{format_duration(forecast['family'])})",
            file=sys.stderr,
        )
    interrupted = False
    if cases:
        ash_where = where + f": about {format_duration(forecast['ash'])}"
        interrupted = _main_ash(args, config, cases, device, ash_where, argv_list)
    if family_cases and not interrupted:
        if cases:
            print()
        where += f": about {format_duration(forecast['family'])}"
        interrupted = _main_family(args, config, family_cases, device, where, argv_list, prefix="family-" * bool(cases))
    return 130 if interrupted else 0


def _main_ash(
    args: argparse.Namespace,
    config: BenchConfig,
    cases: list[Case],
    device: torch.device,
    where: str,
    argv: list[str],
) -> bool:
    """The ASH part of :func:`main`: run, print, write; returns whether it was interrupted."""
    print(f"ash_ext bench: {len(cases)} cases on {device}" + where, file=sys.stderr)
    if pytorch_ood_version() is None and "pytorch-ood" in config.impls:
        print(
            "ash_ext bench: pytorch-ood is not importable; its column stays empty (pip install pytorch-ood)",
            file=sys.stderr,
        )
    data = run(config)
    data["meta"]["argv"] = argv
    print(format_table(data["results"], markdown=args.markdown))
    print()
    for line in summary_lines(data):
        print(line)
    if not args.no_files:
        json_path = os.path.join(args.out, "results.json")
        csv_path = os.path.join(args.out, "results.csv")
        write_json(data, json_path)
        write_csv(data, csv_path)
        written = [json_path, csv_path]
        if not args.no_plot:
            png = os.path.join(args.out, "speedup.png")
            if write_plot(data, png):
                written.append(png)
            elif matplotlib_available():
                print("no speed-up to plot (no case timed both the reference and ash_ext)")
            else:
                print("matplotlib is not installed: skipping the plot (pip install matplotlib, or ash_ext[plot])")
        print("wrote " + ", ".join(written))
    return bool(data["meta"]["interrupted"])


def _main_family(
    args: argparse.Namespace,
    config: BenchConfig,
    cases: list[Any],
    device: torch.device,
    where: str,
    argv: list[str],
    prefix: str,
) -> bool:
    """The family part of :func:`main` (:mod:`ash_ext.bench.family`): run, print, write ``{prefix}results.*``."""
    print(f"ash_ext bench: {len(cases)} family cases on {device}" + where, file=sys.stderr)
    if pytorch_ood_version() is None:
        print(
            "ash_ext bench: pytorch-ood is not importable; its algorithms, copied in torch, stand in as references",
            file=sys.stderr,
        )
    data = family.run(config)
    data["meta"]["argv"] = argv
    print(family.format_table(data["results"], markdown=args.markdown))
    print()
    for line in family.summary_lines(data):
        print(line)
    if not args.no_files:
        json_path = os.path.join(args.out, f"{prefix}results.json")
        csv_path = os.path.join(args.out, f"{prefix}results.csv")
        write_json(data, json_path)
        family.write_csv(data, csv_path)
        print("wrote " + ", ".join([json_path, csv_path]))
    return bool(data["meta"]["interrupted"])
