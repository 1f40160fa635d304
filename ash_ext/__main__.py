"""The ``ash-ext`` command (also ``python -m ash_ext``): ``bench``, ``demo`` and ``plan``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

SUBCOMMANDS: dict[str, str] = {
    "bench": "time ash_ext against the reference, pytorch-ood, the fallback and x.clone(); --methods family: "
    "SCALE, ReAct+ASH, LTS, topk_stats, per-sample percentiles, ReAct's fit (run 'bench --help')",
    "demo": "a 10-second demo: a tiny conv backbone + head through ash_ext.ASH, scores and one speed-up",
    "plan": "the CUDA launch plan for a shape on an H100, H200, A100 or this GPU: regime, grid, launches, "
    "global traffic (no GPU needed; run 'plan --help')",
}


def _top_parser(prog: str) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=prog,
        description="ash_ext: fused ASH (activation shaping) for out-of-distribution detection.",
        epilog="subcommands:\n" + "\n".join(f"  {name:<8}{text}" for name, text in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [-h] [--version] {{{','.join(SUBCOMMANDS)}}} ...",
    )
    parser.add_argument("--version", action="version", version=f"ash_ext {__version__} (torch {torch.__version__})")
    return parser


def _demo_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=SUBCOMMANDS["demo"])
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    return parser


def demo(argv: Sequence[str] | None = None, prog: str = "ash-ext demo") -> int:
    """A short demo: ASH as an OOD detector on a tiny random conv net, then one speed-up measurement."""
    from torch import nn

    from . import ASH, implementation_for, reference
    from .bench.cases import best_device
    from .bench.config import BenchConfig
    from .bench.runner import run

    parser = _demo_parser(prog)
    args = parser.parse_args(argv)
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    device = torch.device(args.device) if args.device else best_device()
    torch.manual_seed(args.seed)

    backbone = (
        nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 512, 3, stride=2, padding=1), nn.ReLU())
        .to(device)
        .eval()
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)).to(device).eval()
    # "In-distribution": smooth images; "out-of-distribution": uniform noise of a wider range.
    smooth = torch.nn.functional.interpolate(torch.randn(8, 3, 4, 4), size=32, mode="bilinear", align_corners=False)
    noise = torch.rand(8, 3, 32, 32) * 4 - 2
    images = {"smooth (ID)": smooth.to(device), "noise (OOD)": noise.to(device)}
    with torch.no_grad():
        maps = backbone(images["smooth (ID)"])
    print(f"ash_ext demo on {device}: backbone -> feature maps {list(maps.shape)} -> ASH -> head -> energy score")
    print(f"ash_ext runs as: {implementation_for(maps)}")
    print(
        f"{'variant':<8} {'mean score, smooth (ID)':>24} {'mean score, noise (OOD)':>24} "
        f"{'max |ash_ext - reference|':>26}"
    )
    refs = {"ash-p": reference.ash_p, "ash-b": reference.ash_b, "ash-s": reference.ash_s}
    for variant in ("ash-p", "ash-b", "ash-s"):
        detector = ASH(backbone, head, variant=variant, percentile=0.65)
        scores = {name: detector(x) for name, x in images.items()}
        ref_detector = ASH(backbone, head, variant=variant, percentile=0.65)
        ref_detector.ash = refs[variant]
        worst = max(float((detector(x) - ref_detector(x)).abs().max()) for x in images.values())
        print(
            f"{variant:<8} {float(scores['smooth (ID)'].mean()):>24.4f} "
            f"{float(scores['noise (OOD)'].mean()):>24.4f} {worst:>26.2e}"
        )
    print("(a random untrained net: the scores show the pipeline, not a detector's quality)")

    print("\ntiming ASH-S on ResNet-50 layer-4 maps [16, 2048, 7, 7] float32, p=0.65 ...", flush=True)
    started = time.perf_counter()
    data = run(
        BenchConfig(
            device=str(device),
            shapes=["resnet50-l4"],
            batches=[16],
            variants=["ash-s"],
            dtypes=["float32"],
            percentiles=[0.65],
            impls=["reference", "ash_ext", "clone"],
            min_time=0.3,
            progress=False,
            seed=args.seed,
        )
    )
    row = data["results"][0]
    t = row["timings"]
    print(
        f"reference (topk + scatter, in place) {t['reference']['median_ms']:.2f} ms, "
        f"ash_ext {t['ash_ext']['median_ms']:.2f} ms, x.clone() {t['clone']['median_ms']:.2f} ms: "
        f"ash_ext is {row['speedup_vs_reference']:.1f}x faster than the reference, "
        f"at {row['pct_of_clone']:.0f}% of the clone's bandwidth "
        f"(max relative deviation {row['max_rel_dev']:.1e}; {time.perf_counter() - started:.1f} s)"
    )
    print("for the full comparison: python -m ash_ext bench --quick")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ash-ext`` / ``python -m ash_ext``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "ash-ext"
    parser = _top_parser(prog)
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv[:1])
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(rest, prog=f"{prog} bench")
    if command == "demo":
        return demo(rest, prog=f"{prog} demo")
    if command == "plan":
        from .plan import main as plan_main

        return plan_main(rest, prog=f"{prog} plan")
    parser.print_usage(sys.stderr)
    print(f"{prog}: error: unknown subcommand {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
