"""``slidestream check-streaming``: compare streaming with conventional backprop on random data."""

from __future__ import annotations

import argparse

_DTYPES = ("float64", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-streaming",
        help="check that streaming gives the same output and gradients as conventional backprop",
        description=(
            "Run one training step of a model's trunk on a random image conventionally and "
            "streamed tile by tile; print the output error, the input-gradient error and per "
            "parameter group the max abs / max relative gradient error against ordinary "
            "float64 backprop (below float64: beside the error of ordinary backprop in the "
            "same dtype), with time and peak memory of both. Exit 1 if float64 streaming is "
            "off by more than 1e-10, or, below float64, if streaming is worse than ordinary "
            "backprop in that dtype (more than 2x its error)."
        ),
    )
    p.add_argument("--model", default="resnet34", help="torchvision model name (default resnet34)")
    p.add_argument(
        "--stream-until", default=None, help="last trunk stage (default: last conv stage)"
    )
    p.add_argument(
        "--split-after",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="stream in stages, cut after these trunk stages (e.g. layer2)",
    )
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=(1536, 1213),
        metavar=("W", "H"),
        help="image width and height in px (default 1536 1213)",
    )
    p.add_argument("--tile", type=int, default=512, help="tile size in px (default 512)")
    p.add_argument("--dtype", choices=_DTYPES, default="float64", help="default float64")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and input (0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def _format(result: dict) -> str:
    side = "conventional_max_rel_err" in result  # below float64: ordinary backprop beside
    dtype = result["dtype"]
    lines = [
        f"trunk stride {result['stride']} px, receptive field {result['receptive_field']} px, "
        f"tiles per stage {result['tiles']}, recompute factor per stage "
        f"{', '.join(f'{r:.2f}' for r in result['recompute_factor'])}, "
        f"geometry probe {result['probe_s']:.1f} s",
        "relative errors against ordinary float64 backprop"
        + (f"; streaming and ordinary {dtype} backprop side by side" if side else ""),
        f"{'group':<28} {'params':>6} {'max abs err':>12} {'max rel err':>12}"
        + (f" {dtype + ' backprop':>16}" if side else ""),
    ]
    rows = [(n, g["params"], g) for n, g in result["groups"].items()]
    rows += [(n, "", result[n]) for n in ("input_grad", "output")]
    for name, params, e in rows:
        conv = f" {e['conventional_max_rel']:>16.3e}" if side else ""
        lines.append(f"{name:<28} {params:>6} {e['max_abs']:>12.3e} {e['max_rel']:>12.3e}{conv}")
    for name in ("conventional", "streaming"):
        r = result[name]
        lines.append(
            f"{name:<13} time {r['time_s']:8.2f} s   peak memory +{r['peak_mem_mb']:.0f} MB"
        )
    verdict = "OK" if result["ok"] else "FAIL"
    if side:
        lines.append(
            f"{verdict}: streaming max relative error {result['max_rel_err']:.3e}, ordinary "
            f"{dtype} backprop {result['conventional_max_rel_err']:.3e} (passes up to "
            f"{result['tolerance']:.3e}: no worse than ordinary {dtype})"
        )
    else:
        lines.append(
            f"{verdict}: max relative error {result['max_rel_err']:.3e} "
            f"(tolerance {result['tolerance']:.0e} for {dtype})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from slidestream.errors import ConfigError
    from slidestream.models import split_model
    from slidestream.streaming.check import check_streaming

    if args.batch < 1 or min(args.size) < 1 or args.tile < 1:
        raise ConfigError(
            f"--batch, --size and --tile must be positive, got {args.batch}, {args.size}, {args.tile}"
        )
    trunk, _ = split_model(args.model, stream_until=args.stream_until)
    result = check_streaming(
        trunk,
        size=tuple(args.size),
        tile=args.tile,
        dtype=getattr(torch, args.dtype),
        batch=args.batch,
        seed=args.seed,
        device=args.device,
        split_after=tuple(args.split_after),
    )
    result["model"] = args.model
    print(json.dumps(result) if args.json else _format(result))
    return 0 if result["ok"] else 1
