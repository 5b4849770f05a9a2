"""SteppingNet's construction rules, one change at a time: what each does to the subnets' MACs,
structure and accuracy (issue: "construction that uses its budgets").

Every variant is the comparison harness's SteppingNet (``compare``'s builder: the same steps,
batch, lr and seed as every baseline), differing only in SteppingConfig fields. Per variant it
records the MAC fraction of each subnet against its budget, accuracy, the channels per tag in
every layer, how many channels were dropped with an Eq. 3 score of exactly 0 and how many while
no reader could see them (unmeasured), and how many end unreachable.

    python benchmarks/stepping_construction.py                       # LeNet-5 x2, CIFAR-10, 1200 steps
    python benchmarks/stepping_construction.py --data digits --steps 200 --variants ours,paper
    python benchmarks/stepping_construction.py --steps 4500 --variants fig7,fig8 --stem stepping_figs78_lenet-5_cifar10

Two variants run at a time (one thread each) on a 2-core machine. Writes
benchmarks/results/stepping_construction_<model>_<data>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PAPER = {"unmeasured": "paper", "quota": "paper", "fill_back": False, "granularity": 1, "lr_schedule": "constant"}
VARIANTS = {
    # dyninfer before the construction fixes: the paper's rules, and a weight decayed once per
    # subnet that trains it (3.4x for tag 1)
    "before": {**PAPER, "decay_per_subnet": True},
    "paper": PAPER,                                            # + weight decay once per batch (all methods)
    "wait": {**PAPER, "unmeasured": "wait"},                   # + unmeasured channels wait
    "ours": {},                                                # + fill-back: the defaults
    "ours-adaptive": {"quota": "adaptive"},                    # + adaptive quota (aims at 75 % of N_t)
    "ours-cosine": {"lr_schedule": "cosine"},                  # + construction LR warm-up and cosine
    "ours-weighted-sum": {"importance_of": "weighted_sum"},    # Eq. 2's letter: r scales w.x, not the bias
    "ours-g4": {"granularity": 4},
    "ours-promote": {"promote": True},                          # + channels promoted to the subnet they serve
    # every increment keeps ceil(fc_floor x width / N) neurons of each fully connected layer
    "ours-fc-floor": {"fc_floor": 0.5},
    "ours-fc-floor-1": {"fc_floor": 1.0},
    # Fig. 7: the expansion ratio of the network construction starts from (LeNet-5's default is 2.0)
    "x1.0": {"expansion": 1.0},
    "x1.4": {"expansion": 1.4},
    "x1.8": {"expansion": 1.8},
    "x2.2": {"expansion": 2.2},
    # Fig. 8: learning-rate suppression off; distillation on (a quarter of the steps first train the
    # original network as Eq. 4's teacher: its steps count against the same budget)
    "no-suppression": {"suppression": False},
    "distilled": {"teacher_fraction": 0.25},
}
FIGURES = {"fig7": "x1.0,x1.4,x1.8,x2.2", "fig8": "ours,no-suppression,distilled"}


def run_variant(job: tuple) -> dict:
    name, rules, settings = job
    import torch

    torch.set_num_threads(1)
    from dyninfer import cost, data, models
    from dyninfer.methods import stepping
    from dyninfer.methods.registry import Setup

    train, test = data.load(settings["data"], root=settings.get("data_root"))
    original = models.create(settings["model"], num_classes=train.num_classes, input_shape=train.input_shape)
    reference = cost.macs(original, train.input_shape)
    setup = Setup(settings["model"], train, settings["budgets"], settings["steps"], settings["batch_size"],
                  settings["seed"], settings["lr"], reference, False, dict(rules), {})
    start = time.perf_counter()
    try:
        net = stepping.build_for_comparison(setup)
    except RuntimeError as err:  # e.g. budgets a coarse granularity cannot reach: recorded, not fatal
        return {"variant": name, "rules": rules, "failed": str(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    h = net.history
    rounds = h["iterations"] + h.get("trims", [])
    return {"variant": name, "rules": rules, "seconds": seconds, "phases": h["phases"],
            "mac_fractions": net.mac_fractions(), "accuracy": net.evaluate(test), "counts": h["final_counts"],
            "fill_back": h.get("fill_back"), "unreachable": h["unreachable"],
            "dropped_zero_score": sum(r.get("dropped_zero_score", 0) for r in rounds),
            "dropped_unmeasured": sum(r.get("dropped_unmeasured", 0) for r in rounds),
            "dropped_idle": h.get("dropped_idle"),
            "construction_iterations": len(h["iterations"]), "trim_rounds": h["trim_rounds"]}


def markdown(record: dict) -> str:
    s = record["settings"]
    budgets = s["budgets"]
    lines = [f"# SteppingNet construction rules: {s['model']} on {s['data']}", "",
             f"Command: `{record['command']}`", "",
             f"Each variant: the comparison harness's SteppingNet, {s['steps']} optimizer steps x batch "
             f"{s['batch_size']}, lr {s['lr']}, seed {s['seed']}, budgets {budgets}; no teacher unless a variant sets "
             f"teacher_fraction (that share of the steps first trains the original network as Eq. 4's teacher). "
             f"Machine: {record['machine']['cpu']}, 1 thread per variant, two variants at a time; "
             f"wall time {record['wall_seconds']:.0f} s.", "",
             "| variant | rules | accuracy % per subnet | MACs % (of budget) | dropped: score 0 / unmeasured | "
             "unreachable at end | fill-back | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in record["variants"]:
        rules = ", ".join(f"{k}={v}" for k, v in r["rules"].items()) or "defaults"
        if "failed" in r:
            lines.append(f"| {r['variant']} | {rules} | failed: {r['failed']} | | | | | {r['seconds']:.0f} |")
            continue
        macs = " / ".join(f"{100 * f:.1f} ({f / b:.3f})" for f, b in zip(r["mac_fractions"], budgets))
        lines.append(f"| {r['variant']} | {rules} | {' / '.join(f'{100 * a:.2f}' for a in r['accuracy'])} | {macs} | "
                     f"{r['dropped_zero_score']} / {r['dropped_unmeasured']} | {sum(r['unreachable'])} | "
                     f"{r['fill_back']} | {r['seconds']:.0f} |")
    lines += ["", "## Channels per tag (1..N, then dropped), per layer", ""]
    for r in record["variants"]:
        if "failed" in r:
            continue
        lines.append(f"- **{r['variant']}**: " + "; ".join(" / ".join(map(str, c)) for c in r["counts"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet-5")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default="0.15,0.3,0.6,0.85")
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:9]),
                        help=f"comma-separated variants, or a figure: {', '.join(f'{k} = {v}' for k, v in FIGURES.items())}")
    parser.add_argument("--stem", default=None, help="result file name (default stepping_construction_<model>_<data>)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    names = [v for part in args.variants.split(",") for v in FIGURES.get(part, part).split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from dyninfer import data, report

    data.load(args.data, root=args.data_root)  # fail here, before any training, if the data is missing
    settings = {"model": args.model, "data": args.data, "data_root": args.data_root, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "budgets": [float(b) for b in args.budgets.split(",")]}
    command = " ".join(["python", "benchmarks/stepping_construction.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    print(f"command: {command}")
    stem = out / (args.stem or f"stepping_construction_{args.model}_{args.data}")
    record = {"command": command, "machine": report.machine(), "settings": settings, "variants": []}
    start = time.perf_counter()
    jobs = [(n, VARIANTS[n], settings) for n in names]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap(run_variant, jobs):  # saved as each arrives
            record["variants"].append(result)
            record["wall_seconds"] = time.perf_counter() - start
            stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
            stem.with_suffix(".md").write_text(markdown(record))
            if "failed" in result:
                print(f"{result['variant']}: failed: {result['failed']}", flush=True)
                continue
            print(f"{result['variant']}: accuracy {[round(100 * a, 2) for a in result['accuracy']]} at MACs "
                  f"{[round(100 * f, 1) for f in result['mac_fractions']]} ({result['seconds']:.0f} s)", flush=True)
    print(f"wrote {stem}.md and .json in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
