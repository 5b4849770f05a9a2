"""``dyninfer nonuniform train|eval|bench``: non-uniform subnets from the command line.

``train`` writes ``nonuniform.{safetensors,json}``, ``run.json``, ``table.{md,json}`` and
``widths.png`` (each subnet's per-layer widths beside the uniform multiplier of equal MACs);
``eval`` reprints the table; ``bench`` times every subnet's dense export against the full
network, interleaved, at each batch size. User errors raise ValueError / FileNotFoundError.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from dyninfer import argtypes, models, report, runs  # noqa: E402
from dyninfer import data as data_module  # noqa: E402
from dyninfer.cli.common import add_run_arguments  # noqa: E402
from dyninfer.methods import nonuniform  # noqa: E402
from dyninfer.runtime.timing import interleaved, summarize  # noqa: E402

__all__ = ["add_commands", "cmd_train", "cmd_eval", "cmd_bench", "plot_widths"]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("nonuniform", help="non-uniform subnets: per-layer widths by importance (Yang et al.)")
    sub = group.add_subparsers(dest="nonuniform_command", required=True, metavar="ACTION")

    p = sub.add_parser("train", help="warm up, choose widths per budget, train jointly, recalibrate BN")
    p.add_argument("--model", default="resnet-20")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--budgets", type=argtypes.budgets, default=[0.25, 0.5, 0.75, 1.0],
                   help="fractions of the original MACs (--by macs) or of the full net's latency (--by latency)")
    p.add_argument("--by", choices=nonuniform.BY, default="macs")
    p.add_argument("--search", choices=nonuniform.SEARCHES, default="global")
    p.add_argument("--importance", choices=sorted(nonuniform.IMPORTANCES), default="filter-norm")
    p.add_argument("--multiple", type=argtypes.positive_int, default=8, help="round channel counts to this")
    p.add_argument("--latency-batch", type=argtypes.positive_int, default=1)
    p.add_argument("--latency-checks", type=argtypes.nonneg_int, default=2,
                   help="--by latency: rounds of timing the chosen subnets and re-choosing those over budget "
                        "(0: trust the per-layer table)")
    p.add_argument("--steps", type=argtypes.positive_int, default=1000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--group-lasso", type=argtypes.nonneg_float, default=0.0, help="sparsity penalty in warm-up")
    add_run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy and MACs of every subnet of a run")
    p.add_argument("run")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency of every subnet against the full network")
    p.add_argument("run")
    p.add_argument("--batches", type=argtypes.int_list, default=[1, 128])
    p.add_argument("--threads", type=argtypes.positive_int, default=None)
    p.add_argument("--repeats", type=argtypes.positive_int, default=20)
    p.set_defaults(func=cmd_bench)


def _load(run: str) -> tuple[nonuniform.NonUniformNet, dict]:
    meta = runs.read_meta(run, "nonuniform")
    return nonuniform.NonUniformNet.load(Path(run) / "nonuniform"), meta


def _table(net: nonuniform.NonUniformNet, accuracies: list[float]) -> tuple[str, dict]:
    multipliers = net.uniform_multipliers()
    rows = [[k, f"{100 * a:.2f}", f"{100 * f:.2f}", f"{100 * b:.0f}", f"{m:.3f}", " ".join(map(str, net.widths(k)))]
            for k, a, f, b, m in zip(range(1, net.num_subnets + 1), accuracies, net.mac_fractions(), net.budgets,
                                     multipliers)]
    text = report.markdown_table(["subnet", "top-1 (%)", "MACs (%)", "budget (%)", "uniform multiplier, same MACs",
                                  "channels per tag group"], rows)
    return text, {"accuracy": accuracies, "mac_fractions": net.mac_fractions(), "budgets": net.budgets,
                  "widths": [net.widths(k) for k in range(1, net.num_subnets + 1)],
                  "uniform_multipliers": multipliers}


def plot_widths(net: nonuniform.NonUniformNet, path: str | Path) -> Path:
    """Per hidden layer, subnet k's width / full width, with the uniform multiplier of equal MACs."""
    full = [layer.weight.shape[0] for layer in net.net.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(full)), 3.6))
    for k, m in zip(range(1, net.num_subnets + 1), net.uniform_multipliers()):
        ratios = [w / f for w, f in zip(net.layer_widths(k), full)]
        line, = ax.plot(range(1, len(full) + 1), ratios, marker="o", label=f"subnet {k} ({100 * net.mac_fractions()[k - 1]:.0f} % MACs)")
        ax.axhline(m, color=line.get_color(), linestyle=":", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("hidden layer")
    ax.set_ylabel("width / full width")
    ax.set_title("non-uniform widths (dotted: the uniform multiplier with the same MACs)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def cmd_train(args: argparse.Namespace) -> int:
    out = runs.prepare_out(args.out)  # before any work
    if args.model not in models.list_models():
        raise ValueError(f"unknown model {args.model!r}; available: {', '.join(models.list_models())}")
    config = nonuniform.NonUniformConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                         by=args.by, search=args.search, importance=args.importance,
                                         multiple=args.multiple, latency_batch=args.latency_batch,
                                         latency_checks=args.latency_checks, group_lasso=args.group_lasso,
                                         progress=not args.quiet)
    train_set, test_set = data_module.load(args.data, root=args.data_root)
    torch.manual_seed(args.seed)
    model = models.create(args.model, num_classes=train_set.num_classes, input_shape=train_set.input_shape)
    net = nonuniform.train(model, train_set, args.budgets, config, cache_dir=str(out / "latency-cache"))
    net.save(out / "nonuniform")
    text, record = _table(net, net.evaluate(test_set))
    command = shlex.join(["dyninfer"] + sys.argv[1:])
    runs.write_meta(out, {"kind": "nonuniform", "model": args.model, "data": args.data, "data_root": args.data_root,
                          "command": command, "history": net.history})
    report.write(out, "table", f"Command: `{command}`\n\n{text}", {**record, "machine": report.machine()})
    plot_widths(net, out / "widths.png")
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'widths.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    net, meta = _load(args.run)
    _, test_set = data_module.load(meta["data"], root=args.data_root or meta.get("data_root"))
    text, _ = _table(net, net.evaluate(test_set))
    print(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    net, _ = _load(args.run)
    modules = {k: net.export(k).to(memory_format=torch.channels_last) for k in range(1, net.num_subnets + 1)}
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *net.input_shape).contiguous(memory_format=torch.channels_last)
        samples = interleaved({k: (lambda m=m: m(x)) for k, m in modules.items()}, repeats=args.repeats,
                              threads=args.threads)
        full = summarize(samples[net.num_subnets])["median_ms"]
        for k in modules:
            s = summarize(samples[k])
            rows.append([batch, k, f"{100 * net.mac_fractions()[k - 1]:.1f}", f"{s['median_ms']:.3f}",
                         f"{s['min_ms']:.3f}-{s['max_ms']:.3f}", f"{s['median_ms'] / full:.3f}"])
    print(report.markdown_table(["batch", "subnet", "MACs (%)", "median ms", "min-max", "latency / full"], rows))
    return 0
