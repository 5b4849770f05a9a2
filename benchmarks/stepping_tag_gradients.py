"""How fast each tag of a constructed SteppingNet learns: per layer and tag, the size of one
retraining step's gradient relative to the weights it moves (|g| / |w|, after suppression and,
for "mean", the division by the weight of the subnets a tag serves).

The last-increment weakness (subnet N adds almost nothing over subnet N-1) shows here as late
tags moving 4-20x slower than tag 1 under the paper's summed update. Reads a run directory made
by benchmarks/stepping_table1.py and the teacher it retrained with; takes seconds:

    python benchmarks/stepping_tag_gradients.py runs/stepping/lenet-3c1l-cifar10-joint-paper-budgets \\
        --teacher runs/original-warmup/lenet-3c1l-cifar10
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

import dyninfer as dy
from dyninfer import report
from dyninfer.methods.stepping import SteppingNet, SubnetTraining
from dyninfer.train import FrozenTeacher

ROOT = Path(__file__).resolve().parent


def tag_rates(net, config, teacher, batches, mean: bool) -> dict[str, list[float | None]]:
    """layer name -> median over batches of |g| / |w| for each tag 1..N (None: no channel has it)."""
    training = SubnetTraining(net, config, targets=teacher, mean=mean)
    n, rates = net.num_subnets, {}
    for x, y in batches:
        net.zero_grad(set_to_none=True)
        training.loss(net, x, y).backward()
        training.on_after_backward()
        for layer in range(net.num_hidden + 1):
            module = net.classifier if layer == net.num_hidden else net.layers[layer]
            name = "classifier (by input tag)" if layer == net.num_hidden else f"layer {layer}"
            # hidden layers by the tag of their output channel, the classifier by its input's
            tags = net.input_tags(layer) if layer == net.num_hidden else net.layer_tags(layer)
            w, g = module.weight.detach(), module.weight.grad
            if layer == net.num_hidden:
                w, g = w.t(), g.t()
            for t in range(1, n + 1):
                rows = tags == t
                value = float(g[rows].norm() / w[rows].norm()) if rows.any() else None
                rates.setdefault(name, [[] for _ in range(n)])[t - 1].append(value)
    return {name: [statistics.median(v) if v[0] is not None else None for v in per]
            for name, per in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory of benchmarks/stepping_table1.py")
    parser.add_argument("--teacher", type=Path, default=None, help="the original network's run directory")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--stem", default=None, help="write benchmarks/results/<stem>.md/.json")
    args = parser.parse_args()
    if not (args.run / "run.json").exists():
        raise SystemExit(f"{args.run} is not a stepping_table1 run directory (no run.json)")
    command = "python " + " ".join(sys.argv)
    meta = json.loads((args.run / "run.json").read_text())
    stepped = SteppingNet.load(args.run / "stepping")
    net, cfg = stepped.net.train(), stepped.config
    train_set, _ = dy.data.load(meta["data"])
    teacher = None
    if args.teacher is not None:
        spec = net.dyninfer_config
        model = dy.models.create(spec["name"], num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]))
        dy.checkpoint.load_model(args.teacher / "model", model)
        teacher = FrozenTeacher(model)
    batches = list(itertools.islice(train_set.batches(cfg.batch_size, shuffle=True, augment=True,
                                                      generator=torch.Generator().manual_seed(0)), args.batches))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = {}
    for update in ("sum", "mean"):
        net.load_state_dict(state)  # BatchNorm statistics move in train mode; start each from the same point
        results[update] = tag_rates(net, cfg, teacher, batches, mean=update == "mean")
    n = stepped.num_subnets
    parts = [f"# Per-tag learning speed of a constructed SteppingNet\n\nCommand: `{command}`\n\n"
             f"Run: {meta['model']} on {meta['data']}, counts per tag (tags 1..{n}, dropped) "
             f"{net.counts()}; retrain_tag_update of the run: {cfg.retrain_tag_update}. Machine: {report.machine()}\n\n"
             f"Cell: median over {args.batches} training batches of |g| / |w| of the tag's weights in one "
             f"retraining step (Eq. 4{' with the teacher' if teacher else ', no teacher'}, suppression beta "
             f"{cfg.beta}), and in brackets that over tag 1's.\n"]
    for update, rates in results.items():
        rows = [[name] + ["-" if r is None else f"{r:.4f} ({r / per[0]:.2f})" for r in per]
                for name, per in rates.items()]
        parts.append(f"## update: {update}\n\n"
                     + report.markdown_table(["weights"] + [f"tag {t}" for t in range(1, n + 1)], rows) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.stem:
        report.write(ROOT / "results", args.stem, text, {"command": command, "run": str(args.run),
                                                          "counts": net.counts(), "rates": results})


if __name__ == "__main__":
    main()
