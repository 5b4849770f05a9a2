"""Where SteppingNet's construction + retraining time goes, per optimizer step, against training
the largest subnet alone (issue 3's cost target: the whole in <= 1.5x the latter's time).

For each saved run (made by benchmarks/stepping_table1.py) this times, interleaved round by
round on the same batches, one optimizer step of:

  * alone ............ the largest subnet as a plain nn.Sequential of its shapes (BN kept), CE
  * alone+KD ......... the same with the teacher's forward (FrozenTeacher, as retrain runs it) and Eq. 4
  * retrain .......... SteppingNet's joint step on the constructed net, with the teacher (Eq. 4)
  * retrain-noKD ..... the same without the teacher
  * retrain-unordered  the retrain step on the same net with its channels shuffled out of tag order
                       (what retraining ran before ``TaggedNet.order_by_tag``: gathers, not views)
  * construct-start .. the joint step on the width-expanded net construction starts from
  * importance ....... one batch of Eq. 1-3 scores on that expanded net (1 forward, N backwards)

and reports medians with spread as ratios to ``alone``, plus the mean MACs of the largest subnet
over the construction iterations (from the run's history), which bounds what construction
costs per step. Run it alone on the machine (it times):

    python benchmarks/stepping_cost.py runs/stepping/lenet-5-cifar10-joint
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import dyninfer as dy
from dyninfer import report
from dyninfer.methods.stepping import SteppingNet, importance, make_optimizer, subnet_loss, train_step
from dyninfer.nn.tagged import TaggedSequential
from dyninfer.train import FrozenTeacher

ROOT = Path(__file__).resolve().parent


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def shuffled(net: TaggedSequential, seed: int = 0) -> TaggedSequential:
    """A copy of ``net`` with every group's channels in a random order (the same function and tags):
    order_by_tag sorts by random keys, then the real tags are put back in the new order."""
    out = copy.deepcopy(net)
    real = [out.tags(g).clone() for g in range(out.num_groups)]
    g_rng = torch.Generator().manual_seed(seed)
    for g in range(out.num_groups):
        out.tags(g).copy_(torch.randperm(len(real[g]), generator=g_rng))
    for g, perm in enumerate(out.order_by_tag()):
        out.tags(g).copy_(real[g][perm])
    return out


def probe(run_dir: Path, rounds: int, steps: int, original_runs: Path) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    net = SteppingNet.load(run_dir / "stepping")
    cfg = net.config
    train_set, _ = dy.data.load(meta["data"])
    spec = net.net.dyninfer_config
    teacher = dy.models.create(spec["name"], num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]))
    dy.checkpoint.load_model(original_runs / f"{meta['model']}-{meta['data']}" / "model", teacher)
    teacher = FrozenTeacher(teacher)  # as SteppingNet.retrain runs it

    alone = net.net.dense(net.num_subnets, fold_bn=False).train()
    alone_opt = torch.optim.SGD(alone.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    stepped = copy.deepcopy(net.net).train()
    stepped_opt = make_optimizer(stepped, cfg.lr, cfg)
    unordered = shuffled(net.net).train()
    unordered_opt = make_optimizer(unordered, cfg.lr, cfg)
    expanded_model = dy.models.create(spec["name"], num_classes=spec["num_classes"], expansion=spec["expansion"],
                                      input_shape=tuple(spec["input_shape"]))
    start_net = TaggedSequential(expanded_model, net.num_subnets, tuple(spec["input_shape"])).train()
    start_opt = make_optimizer(start_net, cfg.lr, cfg)

    batches = list(itertools.islice(train_set.batches(cfg.batch_size, shuffle=True, augment=True,
                                                      generator=torch.Generator().manual_seed(0)), steps + 1))

    def plain(x, y, with_teacher):
        alone_opt.zero_grad(set_to_none=True)
        t = teacher(x) if with_teacher else None
        subnet_loss(alone(x), y, t, cfg).backward()
        alone_opt.step()

    def stepping(x, y, with_teacher, model=stepped, opt=stepped_opt):
        t = teacher(x) if with_teacher else None
        train_step(model, x, y, opt, cfg, t)

    cases = {
        "alone": lambda x, y: plain(x, y, False),
        "alone+KD": lambda x, y: plain(x, y, True),
        "retrain": lambda x, y: stepping(x, y, True),
        "retrain-noKD": lambda x, y: stepping(x, y, False),
        "retrain-unordered": lambda x, y: stepping(x, y, True, unordered, unordered_opt),
        "construct-start": lambda x, y: train_step(start_net, x, y, start_opt, cfg),
        "importance": lambda x, y: importance(start_net, [(x, y)], cfg),
    }
    for fn in cases.values():  # warm-up
        fn(*batches[0])
    times = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved: every case sees the same load drift
        for name, fn in cases.items():
            per = [_timed(lambda b=b: fn(*b)) for b in batches[1:]]
            times[name].append(statistics.median(per))
    base = statistics.median(times["alone"])
    ratios = {}
    for name, values in times.items():
        r = [v / b for v, b in zip(values, times["alone"])]
        ratios[name] = {"median": statistics.median(r), "min": min(r), "max": max(r),
                        "ms": 1000 * statistics.median(values)}
    history = net.history.get("iterations", [])
    largest = [h["macs"][-1] for h in history]
    final = net.mac_fractions()[-1]
    return {
        "run": str(run_dir), "model": meta["model"], "data": meta["data"], "batch_size": cfg.batch_size,
        "alone_ms": 1000 * base, "ratios": ratios, "construction_iterations": len(history),
        "largest_subnet_macs_mean_during_construction": statistics.mean(largest) if largest else None,
        "largest_subnet_macs_at_start": largest[0] if largest else None,
        "largest_subnet_macs_final": final,
    }


def render(results: list[dict], command: str, threads: int, load: str, machine: dict | None = None) -> str:
    parts = [f"# SteppingNet construction cost per step\n\nCommand: `{command}`\n\n"
             f"Machine: {machine or report.machine()} ({threads} torch thread(s); {load})\n\n"
             "Cell: median over rounds of (median step time of the case / that of `alone` in the same round), "
             "with the min-max spread. `alone` trains the largest subnet as a plain network of its shapes "
             "with BatchNorm and CE.\n"]
    for r in results:
        rows = [[name, f"{v['median']:.2f}", f"{v['min']:.2f}-{v['max']:.2f}", f"{v['ms']:.1f}"]
                for name, v in r["ratios"].items()]
        parts.append(f"## {r['model']} on {r['data']} (batch {r['batch_size']})\n\n"
                     + report.markdown_table(["step", "x alone", "spread", "ms"], rows) + "\n")
        if r["largest_subnet_macs_at_start"] is not None:
            parts.append(
                f"Largest subnet's MACs (fraction of the original network) during construction: "
                f"{r['largest_subnet_macs_at_start']:.2f} at the start, mean "
                f"{r['largest_subnet_macs_mean_during_construction']:.2f} over {r['construction_iterations']} "
                f"iterations, {r['largest_subnet_macs_final']:.2f} at the end.\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of benchmarks/stepping_table1.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--original", type=Path, default=Path("runs/original"), help="where the teachers live")
    parser.add_argument("--stem", default="stepping_cost")
    parser.add_argument("--load", default="nothing else running",
                        help="what else ran on the machine, recorded in the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python " + " ".join(sys.argv)
    print(command, flush=True)
    results = []
    for run in args.runs:
        if not (run / "run.json").exists():
            parser.error(f"{run} is not a run directory of benchmarks/stepping_table1.py (no run.json)")
        results.append(probe(run, args.rounds, args.steps, args.original))
        print(json.dumps({"run": str(run), "ratios": {k: round(v["median"], 2) for k, v in results[-1]["ratios"].items()}}),
              flush=True)
    text = render(results, command, args.threads, args.load)
    report.write(ROOT / "results", args.stem, text, {"command": command, "machine": report.machine(),
                                                     "threads": args.threads, "load": args.load, "results": results})
    print(text)


if __name__ == "__main__":
    main()
