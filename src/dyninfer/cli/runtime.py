"""``dyninfer export``, ``dyninfer bench`` and ``dyninfer simulate``: registered on the main parser by :func:`add_commands`.

User errors raise ValueError / FileNotFoundError with a one-line message; the main CLI prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from pathlib import Path

import torch

from dyninfer import argtypes, data, export, runs
from dyninfer import checkpoint as ckpt
from dyninfer import report
from dyninfer.methods.stepping import SteppingNet
from dyninfer.runtime import bench
from dyninfer.runtime import simulate as sim
from dyninfer.nn.tagged import TaggedNet


def load_run(run: str | Path):
    """(SteppingNet, run meta) of a run directory made by `dyninfer construct` / `dyninfer demo`."""
    run = Path(run)
    meta = runs.read_meta(run, "stepping")
    if not (run / "stepping.json").exists():
        raise FileNotFoundError(f"{run} has no stepping checkpoint (stepping.json / stepping.safetensors)")
    return SteppingNet.load(run / "stepping"), meta


def _command(args: argparse.Namespace, name: str, flags: list[tuple[str, object]]) -> str:
    parts = ["dyninfer", name, str(args.run)]
    for flag, value in flags:
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


# ---------------------------------------------------------------------------- export
EXPORT_FORMATS = ("onnx", "torchscript", "pt")


def _exported_runner(fmt: str, path: Path):
    """A function running the file just written, loaded the way a deployment would load it."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        return lambda x: module(x)
    if fmt == "pt":
        module = torch.load(path, weights_only=False)  # our own file, written a moment ago
        return lambda x: module(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path))
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _reference_logits(net, x: torch.Tensor, k: int) -> torch.Tensor:
    """The library's answer the export is checked against: for a tagged net its masked form, an
    independent route (eval-mode ``net(x, subnet=k)`` runs the compacted form the export is cut from)."""
    tagged = getattr(net, "net", None)
    if isinstance(tagged, TaggedNet):
        tagged.eval()
        return tagged(x, subnet=k)
    return net(x, subnet=k) if hasattr(net, "num_subnets") else net(x)


def cmd_export(args: argparse.Namespace) -> int:
    """Subnet k of a run as a file that needs only torch (pt, torchscript) or onnxruntime (onnx),
    checked against the library on a batch of the run's test images. Everything is checked before
    anything is written."""
    out = Path(args.file)  # a file, not a run folder: the CLI's --out folder checks do not apply
    if args.format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"--format onnx needs {', '.join(missing)}: pip install 'dyninfer[onnx]'")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the file to write")
    folder = out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: folder {folder} does not exist or is not writable")
    meta = runs.read_meta(args.run, tuple(runs.KINDS))
    if meta["kind"] == "lcnet":
        raise ValueError(f"{args.run} is an LC-Net run: it picks its network per input, so it has no subnet k to "
                         f"export as one file")
    if meta["kind"] == "doubly-nested":
        raise ValueError(f"{args.run} is a doubly nested run: its subnets are (depth, width) cells; export one from "
                         f"Python with dy.export.dense(dy.load(run), k) (k: frontier cell) or grid.dense(depth, width)")
    net = runs.load(args.run)
    count = getattr(net, "num_subnets", 1)
    k = count if args.subnet is None else args.subnet
    if not 1 <= k <= count:
        raise ValueError(f"--subnet must be in 1..{count} for {args.run}, got {k}")
    _, test = data.load(meta["data"], root=meta.get("data_root"), download=False)
    if args.format == "onnx":
        export.onnx(net, k, out)
    elif args.format == "torchscript":
        export.torchscript(net, k, out)
    else:
        torch.save(export.dense(net, k), out)
    x, _ = next(test.batches(args.check_images))
    with torch.no_grad():
        expected = _reference_logits(net, x, k)
        got = _exported_runner(args.format, out)(x)
    diff = float((got - expected).abs().max())
    print(f"wrote {out} ({args.format}, subnet {k} of {count}, {out.stat().st_size / 1024:.0f} KiB); on {len(x)} test "
          f"images of {meta['data']} its logits differ from the library's by at most {diff:.2e}")
    if diff > args.tolerance:
        raise ValueError(f"the exported {args.format} file disagrees with the library by {diff:.2e} "
                         f"(> --tolerance {args.tolerance:g}); {out} is kept for inspection")
    return 0


# ---------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:

    net, _ = load_run(args.run)
    out = Path(args.out) if args.out else Path(args.run)
    command = _command(args, "bench", [("--batches", args.batches), ("--threads", args.threads),
                                       ("--repeats", args.repeats), ("--warmup", args.warmup),
                                       ("--choose-scratch", args.choose_scratch or None),
                                       ("--out", args.out)])
    machine = report.machine()
    print(f"{command}\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
    result = bench.run_bench(net, batches=args.batches, threads=args.threads, repeats=args.repeats,
                             warmup=args.warmup, progress=not args.quiet)
    result["command"] = command
    if args.choose_scratch:  # the first setting decides; its times are in the tables below
        rows = net.prefer_faster(*bench.scratch_times(result["settings"][0]))
        first = result["settings"][0]
        result["scratch_choice"] = {"batch": first["batch"], "threads": first["threads"], "subnets": rows,
                                    "scratch_macs": [int(m) for m in net.macs(path="scratch")]}
    text = bench.markdown(result, title=f"Runtime benchmark of {args.run}")
    if args.choose_scratch:
        choice = result["scratch_choice"]
        text += "\n\n" + report.markdown_table(
            ["subnet", "rectangles ms", "chain ms", "from scratch as", "MACs from scratch"],
            [(r["subnet"], f"{r['rectangle_ms']:.3f}", f"{r['chain_ms']:.3f}", r["chosen"], f"{m:,}")
             for r, m in zip(choice["subnets"], choice["scratch_macs"])])
        text += (f"\n\nSaved into {args.run}: eval-mode `net(x, subnet=k)` runs the chosen execution and "
                 f"`mac_fractions(path=\"scratch\")` counts it (chosen at batch {choice['batch']}, "
                 f"{choice['threads']} thread(s)).")
    md, js = report.write(out, "bench", text, result)  # first: a failed save below loses no timing
    if args.choose_scratch:
        tensors, saved = ckpt.load(Path(args.run) / "stepping")
        ckpt.save(Path(args.run) / "stepping", tensors, {**saved, "scratch_execution": net.scratch_execution})
    print(text)
    print(f"wrote {md} and {js}")
    return 0


# ---------------------------------------------------------------------------- simulate
def _test_inputs(net, meta: dict, data_root: str | None, limit: int, seed: int):
    """(inputs, labels, description): the run's test set, or synthetic inputs if unavailable."""
    try:
        _, test = data.load(meta["data"], root=data_root or meta.get("data_root"), download=False)
        x, y = next(test.batches(min(limit, len(test))))
        if tuple(x.shape[1:]) != tuple(net.input_shape):
            raise ValueError("shape mismatch")
        return x, y, f"{meta['data']} test set ({x.shape[0]} images)"
    except (FileNotFoundError, ValueError, KeyError, StopIteration):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(limit, *net.input_shape, generator=g)
        with torch.inference_mode():
            y = net.compact()(x).argmax(1)
        return x, y, (f"synthetic inputs ({limit}; data set {meta.get('data')!r} unavailable): accuracy is "
                      f"agreement with the largest subnet")


def cmd_simulate(args: argparse.Namespace) -> int:

    net, meta = load_run(args.run)
    cnet = net.compact()
    macs = cnet.macs()
    if args.make_trace:
        trace = sim.make_trace(args.trace, high=float(macs[-1]), low=float(macs[-1]) / 10,
                               duration_ms=args.trace_ms, segment_ms=args.segment_ms, seed=args.seed)
        print(f"wrote an example trace to {args.trace} ({len(trace.times)} rows over {trace.span_ms:g} ms; "
              f"peak {macs[-1]:,} MACs/ms runs the largest subnet in 1 ms)")
    trace = sim.load_trace(args.trace)
    deadlines = args.deadlines or sim.default_deadlines(trace, macs)
    x, y, labels = _test_inputs(net, meta, args.data_root, args.inputs, args.seed)
    correct = sim.correctness(cnet, x, y)
    result = sim.simulate(trace, macs, correct, deadlines, inputs=args.inputs)
    result["labels"] = labels
    result["static_accuracy"] = correct.float().mean(0).tolist()
    result["command"] = _command(args, "simulate", [("--trace", args.trace), ("--make-trace", args.make_trace),
                                                    ("--trace-ms", args.trace_ms if args.make_trace else None),
                                                    ("--segment-ms", args.segment_ms if args.make_trace else None),
                                                    ("--deadlines", args.deadlines), ("--inputs", args.inputs),
                                                    ("--seed", args.seed), ("--out", args.out)])
    out = Path(args.out) if args.out else Path(args.run)
    text = sim.markdown(result)
    md, js = report.write(out, "simulate", text, {**result, "machine": report.machine()})
    png = sim.plot(result, trace, out / "simulate.png")
    print(text)
    print(f"wrote {md}, {js} and {png}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``export``, ``bench`` and ``simulate`` on the main CLI's subparsers."""
    p = subparsers.add_parser("export", help="a subnet of a run as a deployable file, checked against the library")
    p.add_argument("run", help="run directory (`dyninfer train`, `construct`, `demo`, `nonuniform train`)")
    p.add_argument("--subnet", type=argtypes.positive_int, default=None, help="which subnet (default: the largest)")
    p.add_argument("--format", default="pt", choices=EXPORT_FORMATS,
                   help="onnx (needs the [onnx] extra), torchscript or pt (default)")
    p.add_argument("--out", dest="file", required=True, help="file to write")
    p.add_argument("--check-images", type=argtypes.positive_int, default=64,
                   help="test images the exported file is checked on (default 64)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted logit difference (default 1e-4)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("bench", help="measure latency: subnets from scratch, steps, stepping path")
    p.add_argument("run", help="run directory of a stepping net (`dyninfer construct` / `dyninfer demo`)")
    p.add_argument("--batches", type=argtypes.int_list, default=[1, 128], help="batch sizes (default 1,128)")
    p.add_argument("--threads", type=argtypes.int_list, default=[1, 2], help="thread counts (default 1,2)")
    p.add_argument("--repeats", type=argtypes.positive_int, default=20, help="timed runs per configuration (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per configuration first (default 5)")
    p.add_argument("--out", default=None, help="where bench.md/bench.json go (default: the run directory)")
    p.add_argument("--choose-scratch", action="store_true",
                   help="keep, per subnet, the faster from-scratch execution (dense rectangles or the chain of "
                        "step blocks) at the first batch and thread count, and save the choice into the run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("simulate", help="anytime inference on a compute trace: incremental vs restart")
    p.add_argument("run", help="run directory of a stepping net")
    p.add_argument("--trace", required=True, help="CSV with columns time_ms,macs_per_ms")
    p.add_argument("--make-trace", action="store_true",
                   help="first write an example trace to --trace, scaled to this net")
    p.add_argument("--trace-ms", type=float, default=500.0, help="length of the example trace (default 500)")
    p.add_argument("--segment-ms", type=float, default=2.0,
                   help="mean time the example trace holds one rate (default 2; the largest subnet takes 1 ms at peak)")
    p.add_argument("--deadlines", type=argtypes.positive_floats, default=None,
                   help="per-input deadlines in ms (default: around the largest subnet's time at the mean rate)")
    p.add_argument("--inputs", type=argtypes.positive_int, default=300, help="inputs played per deadline (default 300)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where simulate.md/.json/.png go (default: the run directory)")
    p.set_defaults(func=cmd_simulate)
