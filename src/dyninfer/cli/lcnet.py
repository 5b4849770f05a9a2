"""`dyninfer lcnet train|eval`: LC-Net from the command line, and its report plots.

``add_commands(subparsers)`` registers the group on the main parser; each command takes the
parsed Namespace and returns an exit code, raising ValueError / FileNotFoundError for user
errors (the main entry point prints those as one line).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dyninfer import argtypes, runs
from dyninfer import checkpoint, data, models, report
from dyninfer.cli.common import add_run_arguments
from dyninfer.data import canonical_name
from dyninfer.methods import lcnet
from dyninfer.methods.lcnet import MODES, PRETRAINED_CONTROL_LR, PRETRAINED_LR

__all__ = ["add_commands", "cmd_train", "cmd_eval", "write_plots"]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``lcnet train`` and ``lcnet eval`` under ``subparsers``."""
    group = subparsers.add_parser("lcnet", help="LC-Net: per-input block and channel skipping (Xia et al.)")
    sub = group.add_subparsers(dest="lcnet_command", required=True, metavar="ACTION")

    p = sub.add_parser("train", help="train an LC-Net from scratch or on a pre-trained backbone (--pretrained)")
    p.add_argument("--model", default="resnet-20", help="zoo ResNet to gate (basic or bottleneck blocks)")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--expansion", type=float, default=1.0, help="backbone width (ignored with --pretrained)")
    p.add_argument("--mode", choices=MODES, default="parallel")
    p.add_argument("--l1", type=argtypes.nonneg_float, default=1.0, help="L1 strength on S_L and S_C")
    p.add_argument("--l1-channel", type=argtypes.nonneg_float, default=None, help="L1 strength on S_C (default: --l1)")
    p.add_argument("--slope", type=argtypes.nonneg_float, default=0.01, help="leaky ReLU-1 slope in training")
    p.add_argument("--pretrained", default=None, metavar="RUN", help="run directory of `dyninfer train`")
    p.add_argument("--epochs", type=argtypes.positive_int, default=10)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help=f"backbone LR (default 0.05; {PRETRAINED_LR} with --pretrained)")
    p.add_argument("--control-lr", type=float, default=None,
                   help=f"control-net LR (default: --lr; {PRETRAINED_CONTROL_LR} with --pretrained)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy, per-image MACs and report plots of an LC-Net run")
    p.add_argument("run", help="run directory of `dyninfer lcnet train`")
    p.add_argument("--data-root", default=None)
    p.add_argument("--mode", choices=MODES, default=None, help="gate schedule (default: the trained one)")
    p.add_argument("--out", default=None, help="where plots and tables go (default: the run directory)")
    p.add_argument("--blocks", type=argtypes.positive_int, default=3, help="last blocks shown in the channel heat map")
    p.add_argument("--grid", type=argtypes.positive_int, default=8, help="images per side of the lowest/highest-MAC grids")
    p.set_defaults(func=cmd_eval)


def _pretrained_backbone(run: Path, data_name: str):

    meta = runs.read_meta(run, "train")

    if canonical_name(str(meta.get("data"))) != canonical_name(data_name):
        raise ValueError(f"--pretrained {run} was trained on {meta.get('data')!r}, not on --data {data_name!r}")
    model = models.create(meta["model"], num_classes=meta["num_classes"], expansion=meta["expansion"],
                          input_shape=tuple(meta["input_shape"]))
    checkpoint.load_model(run / "model", model)
    return model, meta


def cmd_train(args: argparse.Namespace) -> int:

    resnets = [m for m in models.list_models() if m.startswith("resnet")]
    if args.model not in resnets:  # before the data is read: nothing loaded, nothing written
        raise ValueError(f"LC-Net gates the blocks of a ResNet; --model {args.model} is not one "
                         f"(choose from {', '.join(resnets)})")
    train_set, test_set = data.load(args.data, root=args.data_root)
    pretrained = None
    if args.pretrained:
        model, pmeta = _pretrained_backbone(Path(args.pretrained), args.data)
        if pmeta["model"] != args.model:
            raise ValueError(f"--pretrained {args.pretrained} is a {pmeta['model']!r}, not --model {args.model!r}")
        pretrained = {"run": args.pretrained, "top1": pmeta.get("test", {}).get("top1")}
        lr = args.lr if args.lr is not None else lcnet.PRETRAINED_LR
        control_lr = args.control_lr if args.control_lr is not None else lcnet.PRETRAINED_CONTROL_LR
    else:
        torch.manual_seed(args.seed)
        model = models.create(args.model, num_classes=train_set.num_classes, expansion=args.expansion,
                              input_shape=train_set.input_shape)
        lr = args.lr if args.lr is not None else 0.05
        control_lr = args.control_lr
    torch.manual_seed(args.seed)
    net = lcnet.wrap(model, mode=args.mode, slope=args.slope)
    config = lcnet.LCTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, control_lr=control_lr,
                                 l1_layer=args.l1, l1_channel=args.l1 if args.l1_channel is None else args.l1_channel,
                                 seed=args.seed, progress=not args.quiet)
    out = Path(args.out)
    start = time.perf_counter()
    history = lcnet.train(net, train_set, config, test=test_set, out=out)
    seconds = time.perf_counter() - start
    result = lcnet.evaluate(net, test_set).summary()
    runs.write_meta(out, {
        "kind": "lcnet", "model": args.model, "data": args.data, "data_root": args.data_root,
        "num_classes": train_set.num_classes, "input_shape": list(train_set.input_shape),
        "mode": args.mode, "slope": args.slope, "pretrained": pretrained, "config": config.to_dict(),
        "test": result, "seconds": seconds, "epochs_run": len(history),
        "command": " ".join(["dyninfer"] + sys.argv[1:]),
    })
    print(f"LC-Net {args.model} on {args.data} ({args.mode}): test top-1 {100 * result['top1']:.2f} %, "
          f"mean MACs {100 * result['mac_fraction_mean']:.1f} % of the backbone "
          f"({seconds:.0f} s) -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    run = Path(args.run)
    meta = runs.read_meta(run, "lcnet")
    net = lcnet.load(run / "model", mode=args.mode)
    _, test_set = data.load(meta["data"], root=args.data_root or meta.get("data_root"))
    evaluation = lcnet.evaluate(net, test_set)
    summary = evaluation.summary()
    # The real-skipping runtime must agree with the masked reference it is measured against.
    x = next(test_set.batches(16))[0]
    runtime = net.compile()
    with torch.no_grad():
        ref = net.eval()(x)
        summary["runtime_max_abs_diff"] = max(float((runtime(x[i:i + 1]) - ref[i]).abs().max()) for i in range(len(x)))
    out = Path(args.out) if args.out else run
    plots = write_plots(evaluation, test_set, out, blocks=args.blocks, grid=args.grid)
    rows = [("test top-1 (%)", f"{100 * summary['top1']:.2f}"),
            ("mean MACs / backbone (%)", f"{100 * summary['mac_fraction_mean']:.2f}"),
            ("min / median / max (%)", f"{100 * summary['mac_fraction_min']:.1f} / "
             f"{100 * summary['mac_fraction_median']:.1f} / {100 * summary['mac_fraction_max']:.1f}"),
            ("backbone MACs", f"{summary['backbone_macs']:,}"),
            ("all-on MACs incl. gates", f"{summary['full_macs']:,}"),
            ("runtime vs reference max |diff|", f"{summary['runtime_max_abs_diff']:.1e}")]
    rows += [(f"block {name}: kept / channels on (%)",
              f"{100 * summary['keep_rate'][name]:.1f} / {100 * summary['channel_rate'][name]:.1f}")
             for name in evaluation.block_names]
    table = report.markdown_table(["", f"LC-Net {meta['model']} on {meta['data']} ({evaluation.mode})"], rows)
    report.write(out, "lcnet_eval", table + "\n\nPlots: " + ", ".join(p.name for p in plots),
                 {**summary, "plots": [str(p) for p in plots], "machine": report.machine()})
    print(table)
    return 0


# ----------------------------------------------------------------------------- plots


def _image_grid(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (n, C, H, W) -> one (H*rows, W*side, C) uint8 mosaic (1-pixel gaps)."""
    n, c, h, w = images.shape
    rows = -(-n // side)
    canvas = torch.full((rows * (h + 1), side * (w + 1), c), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, side)
        canvas[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = images[i].permute(1, 2, 0)
    return canvas


def write_plots(evaluation: Any, test_set: Any, out: str | Path, blocks: int = 3, grid: int = 8) -> list[Path]:
    """PNG reports: per-image MAC histogram, lowest/highest-MAC image grids, and the channel
    activation rate per class of the last ``blocks`` blocks. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fractions = evaluation.mac_fractions().numpy() * 100

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(fractions, bins=40, color="tab:blue")
    ax.axvline(fractions.mean(), color="tab:red", label=f"mean {fractions.mean():.1f} %")
    ax.set_xlabel("MACs executed / static backbone MACs (%)")
    ax.set_ylabel("test images")
    ax.set_title(f"Per-image MACs ({evaluation.mode}); top-1 {100 * evaluation.top1:.2f} %")
    ax.legend()
    paths.append(out / "lcnet_macs_hist.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    order = torch.argsort(evaluation.macs, stable=True)
    count = min(grid * grid, len(order))
    for tag, idx in (("lowest", order[:count]), ("highest", order[-count:].flip(0))):
        mosaic = _image_grid(test_set.images[idx], min(grid, count))
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(mosaic.squeeze(-1).numpy() if mosaic.shape[-1] == 1 else mosaic.numpy(),
                  cmap="gray" if mosaic.shape[-1] == 1 else None)
        ax.set_axis_off()
        f = evaluation.mac_fractions()[idx]
        ax.set_title(f"{count} {tag}-MAC test images ({100 * float(f.min()):.1f}-{100 * float(f.max()):.1f} % MACs)")
        paths.append(out / f"lcnet_{tag}_macs.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    shown = list(range(max(0, len(evaluation.block_names) - blocks), len(evaluation.block_names)))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4), squeeze=False)
    for ax, i in zip(axes[0], shown):
        im = ax.imshow(evaluation.channel_rate[i].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{evaluation.block_names[i]} (kept {100 * evaluation.keep_rate[i]:.0f} %)")
        ax.set_xlabel("channel of conv1")
        ax.set_ylabel("class")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of the class's images computing the channel")
    paths.append(out / "lcnet_channel_rate.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
