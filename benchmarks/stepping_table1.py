"""Reproduce Table I of the SteppingNet paper (accuracy and MACs of each subnet) on this machine.

For each model:data job: take the original network from runs/original/<model>-<data> (made by
benchmarks/train_original.py; trained here if missing), construct a 4-subnet SteppingNet from the
width-expanded network with the paper's budgets, retrain it with distillation from the original,
and report A_k and M_k/M_t beside the paper's numbers, with wall times and construction cost.

    python benchmarks/stepping_table1.py --jobs lenet-5:fashion-mnist,lenet-5:cifar10

Run it alone on the machine and without OMP_WAIT_POLICY=PASSIVE when its cost ratio matters: passive
threads sleep between parallel regions, and waking them for each of a tagged step's many small ops
put LeNet-5's retraining step at 1.66x training its largest subnet alone instead of 1.45x
(benchmarks/results/stepping_cost_lenet5_cifar10_ordered*.md).

The paper's schedule (N_t = 300 iterations x m = 250 batches) does not fit a CPU session; the
presets below say what was run instead and the results record it. Construction and retraining
checkpoint into runs/stepping/<model>-<data>-<schedule>/: rerunning an interrupted command resumes
them (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import dyninfer as dy
from dyninfer import report
from dyninfer.methods.stepping import SteppingConfig, construct

ROOT = Path(__file__).resolve().parent

BUDGETS = {"lenet-3c1l": [0.10, 0.30, 0.50, 0.85], "lenet-5": [0.15, 0.30, 0.60, 0.85], "vgg-16": [0.15, 0.30, 0.50, 0.70]}
EXPANSION = {"lenet-3c1l": 1.8, "lenet-5": 2.0, "vgg-16": 1.8}
PAPER = {  # Table I, CIFAR-10 (VGG-16: CIFAR-100); accuracy %, MACs %
    ("lenet-3c1l", "cifar10"): {"original": 83.36, "accuracy": [68.5, 77.38, 79.81, 80.4], "macs": [9.65, 29.55, 48.62, 78.52]},
    ("lenet-5", "cifar10"): {"original": 74.96, "accuracy": [51.8, 59.56, 68.64, 72.03], "macs": [13.64, 26.54, 55.07, 82.74]},
    ("vgg-16", "cifar100"): {"original": 70.32, "accuracy": [63.26, 68.19, 68.19, 68.14], "macs": [15.97, 32.54, 47.39, 67.78]},
}
PRESETS = {  # CPU presets: what fits a session on 2 cores; "paper" is the full schedule for a GPU
    "cpu": {"lenet-5": dict(iterations=40, batches_per_iteration=50, retrain_epochs=10, teacher_epochs=15),
            # lr 0.005: without a warm-up LeNet-3C1L collapses at 0.05 (a teacher trained here uses this
            # rate too; benchmarks/train_original.py --warmup-epochs 1 trains one at 0.05 to 84.67 %).
            "lenet-3c1l": dict(iterations=30, batches_per_iteration=25, retrain_epochs=4, teacher_epochs=8,
                               lr=0.005, teacher_lr=0.005),
            "vgg-16": dict(iterations=20, batches_per_iteration=20, retrain_epochs=2, teacher_epochs=5)},
    "smoke": {m: dict(iterations=2, batches_per_iteration=2, retrain_epochs=1, teacher_epochs=1) for m in BUDGETS},
    "paper": {m: dict(iterations=300, batches_per_iteration=250, retrain_epochs=100, teacher_epochs=100) for m in BUDGETS},
}


def teacher_for(model_name: str, data_name: str, train_set, test_set, epochs: int, runs: Path, lr: float = 0.05):
    """The original network: reuse runs/original/<model>-<data> or train it now."""
    out = runs / f"{model_name}-{data_name}"
    model = dy.models.create(model_name, num_classes=train_set.num_classes, input_shape=train_set.input_shape)
    if (out / "model.safetensors").exists():
        dy.checkpoint.load_model(out / "model", model)
        trained_lr = json.loads((out / "config.json").read_text())["train"]["lr"]
        if trained_lr != lr:
            print(f"warning: reusing the teacher in {out}, trained at lr {trained_lr}, not {lr}", flush=True)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        history = dy.train.fit(model, train_set, dy.train.TrainConfig(epochs=epochs, lr=lr, progress=False),
                               test=test_set, out=out, resume=False)
    seconds_per_epoch = sorted(h["seconds"] for h in history)[len(history) // 2]
    return model.eval(), dy.train.evaluate(model, test_set)["top1"], seconds_per_epoch, len(history)


def step_time(module, train_set, batch_size: int, steps: int = 20) -> float:
    """Median seconds of one plain training step of ``module``, its batch's loading and augmentation
    included (as they are in the run it is compared with)."""
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    module.train()
    batches = train_set.batches(batch_size, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))
    times = []
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i >= steps + 3:
            break
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
        end = time.perf_counter()
        if i >= 3:
            times.append(end - start)
        start = end
    return sorted(times)[len(times) // 2]


def reference_steps(net, teacher, train_set, batch_size: int) -> tuple[float, float]:
    """Step times of the cost ratio's references: (largest subnet alone, original network)."""
    largest = net.net.dense(net.num_subnets, fold_bn=False)
    return (step_time(largest, train_set, batch_size),
            step_time(copy.deepcopy(teacher), train_set, batch_size))


def write_run_json(run_dir: Path, model_name: str, data_name: str, original: float) -> None:
    """Make the saved net a run directory that `dyninfer eval/bench/simulate` understand."""
    meta = {"kind": "stepping", "model": model_name, "data": data_name, "data_root": None,
            "expansion": EXPANSION[model_name], "original_accuracy": original,
            "command": "python " + " ".join(sys.argv)}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")


def run_job(model_name: str, data_name: str, preset: dict, schedule: str, runs: Path, seed: int,
            resume: bool = True, paper_budgets: bool = False) -> dict:
    train_set, test_set = dy.data.load(data_name)
    teacher, original, teacher_epoch_s, teacher_epochs = teacher_for(
        model_name, data_name, train_set, test_set, preset["teacher_epochs"], runs, preset.get("teacher_lr", 0.05))
    print(f"[{model_name}/{data_name}] original accuracy {100 * original:.2f} %", flush=True)
    rates = {"lr": preset["lr"], "retrain_lr": preset["lr"]} if "lr" in preset else {}
    rates.update({k: preset[k] for k in ("retrain_lr", "retrain_warmup_epochs", "retrain_tag_update") if k in preset})
    rates.update(preset.get("settings", {}))
    config = SteppingConfig(iterations=preset["iterations"], batches_per_iteration=preset["batches_per_iteration"],
                            retrain_epochs=preset["retrain_epochs"], schedule=schedule, seed=seed, progress=False,
                            **rates)
    torch.manual_seed(seed)
    model = dy.models.create(model_name, num_classes=train_set.num_classes, expansion=EXPANSION[model_name],
                             input_shape=train_set.input_shape)
    run_dir = runs.parent / "stepping" / f"{model_name}-{data_name}-{schedule}{'-paper-budgets' if paper_budgets else ''}"
    # the paper's reached MAC fractions as budgets: every subnet then lands at <= the paper's MACs
    budgets = [m / 100 for m in PAPER[(model_name, data_name)]["macs"]] if paper_budgets else BUDGETS[model_name]
    # Both phases checkpoint into run_dir: rerunning the same command after an interruption resumes
    # them. Their times are summed from the runs' histories, so resumed parts are counted once.
    net = construct(model, train_set, budgets, config, checkpoint=run_dir / "construction",
                    resume=resume)
    construction_s = net.history["construction_seconds"]
    iterations = len(net.history["iterations"])
    # The references (the largest subnet as a network of its own shapes, BatchNorm kept: how it
    # would train alone; and the original network) are timed before retraining and again after
    # it, and the faster time of each counts: a passing load on the machine cannot shrink the
    # cost ratio (at the end of one run both references ran 1.6x slower than at the start of the next).
    before = reference_steps(net, teacher, train_set, config.batch_size)
    log = net.retrain(train_set, teacher=teacher, checkpoint=run_dir / "retraining", resume=resume)
    retrain_s = sum(entry["seconds"] for entry in log)
    accuracies = net.evaluate(test_set)
    fractions = net.mac_fractions()
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    construction_batches = iterations * config.batches_per_iteration
    total_batches = construction_batches + config.retrain_epochs * batches_per_epoch
    after = reference_steps(net, teacher, train_set, config.batch_size)
    alone, original_step = min(before[0], after[0]), min(before[1], after[1])
    total_s = construction_s + retrain_s
    result = {
        "model": model_name, "data": data_name, "schedule": schedule, "expansion": EXPANSION[model_name],
        "budgets": budgets, "original_accuracy": original, "accuracy": accuracies,
        "mac_fraction": fractions, "iterations_run": iterations, "trim_rounds": net.history["trim_rounds"],
        "construction_seconds": construction_s, "retrain_seconds": retrain_s,
        "construction_batches": construction_batches, "retrain_epochs": config.retrain_epochs,
        "epochs_equivalent": total_batches / batches_per_epoch,
        "teacher_seconds_per_epoch": teacher_epoch_s, "teacher_epochs": teacher_epochs,
        "original_step_seconds": original_step,
        "cost_vs_original_same_steps": total_s / (total_batches * original_step),
        "largest_subnet_step_seconds": alone, "alone_timing": "bn+data, min(before, after)",
        "reference_steps_before": before, "reference_steps_after": after, "settings": preset.get("settings", {}),
        "cost_vs_largest_subnet_same_steps": total_s / (total_batches * alone),
        "config": asdict(config), "paper": PAPER.get((model_name, data_name)),
        "counts": net.history["final_counts"], "served_late": net.history.get("served_late"),
        "fill_back": net.history.get("fill_back"), "promoted": net.history.get("promoted"),
    }
    net.save(run_dir / "stepping", extra={"original_accuracy": original})
    write_run_json(run_dir, model_name, data_name, original)
    print(json.dumps({k: result[k] for k in ("model", "data", "schedule", "accuracy", "mac_fraction")}), flush=True)
    return result


def _original_cost(r: dict) -> str:
    if "cost_vs_original_same_steps" in r:  # both step times measured in this run
        return (f"{r['cost_vs_original_same_steps']:.2f}x training the original network for the same steps "
                f"({1000 * r['original_step_seconds']:.0f} ms/step, "
                + ("the faster of its times before and after retraining)" if "reference_steps_before" in r
                   else "timed at the end of this run)"))
    return (f"{r['cost_vs_original_same_epochs']:.2f}x training the original network for the same epochs "
            f"({r['teacher_seconds_per_epoch']:.0f} s/epoch, from the teacher's own run)")


def render(results: list[dict], command: str, preset_name: str) -> str:
    parts = [f"# SteppingNet, Table I on this machine\n\nCommand: `{command}`\n\nPreset: `{preset_name}` "
             f"(the paper runs N_t=300 iterations x m=250 batches and retrains to convergence; "
             f"see each row's schedule)\n\nMachine: {report.machine()}\n"]
    for r in results:
        table, _ = report.subnet_table(r["accuracy"], r["mac_fraction"], r["original_accuracy"], r["budgets"])
        parts.append(f"## {r['model']} on {r['data']} ({r['schedule']} schedule, expansion {r['expansion']})\n\n{table}\n")
        if r["paper"]:
            p = r["paper"]
            parts.append(report.markdown_table(
                ["paper (CIFAR)", "original"] + [f"subnet {k}" for k in range(1, 5)],
                [["accuracy (%)", p["original"]] + p["accuracy"], ["MACs (%)", 100.0] + p["macs"]]) + "\n")
        parts.append(
            f"Schedule run: {r['iterations_run']} construction iterations x {r['config']['batches_per_iteration']} batches "
            f"(+{r['trim_rounds']} move rounds without training), then {r['retrain_epochs']} retraining epochs "
            f"(lr {r['config']['retrain_lr']}, warm-up {r['config'].get('retrain_warmup_epochs', 0)} epochs, cosine, "
            f"{r['config'].get('retrain_tag_update', 'sum')} of the subnets' gradients per tag) "
            f"= {r['epochs_equivalent']:.1f} epochs of data. Wall time: construction {r['construction_seconds']:.0f} s, "
            f"retraining {r['retrain_seconds']:.0f} s. Cost: {_original_cost(r)}, "
            f"{r['cost_vs_largest_subnet_same_steps']:.2f}x training the largest subnet alone for the same steps"
            f"{_alone_note(r)}.\n")
        if r.get("counts"):
            parts.append("Channels per tag (subnets 1..N, then dropped), per hidden layer: "
                         + "; ".join(" / ".join(map(str, c)) for c in r["counts"])
                         + (f". Computed by a subnet but read only by larger ones (served late), per layer: "
                            f"{' / '.join(map(str, r['served_late']))}" if r.get("served_late") is not None else "")
                         + (f". Fill-back re-admitted {r['fill_back']} channels per subnet" if r.get("fill_back") else "")
                         + (f"; {r['promoted']} were promoted to the subnet they serve" if r.get("promoted") is not None
                            else "") + ".\n")
        if r.get("settings"):
            parts.append("Settings beyond the preset (--set): "
                         + ", ".join(f"`{k}={v!r}`" for k, v in r["settings"].items()) + ".\n")
    return "\n".join(parts)


def _alone_note(r: dict) -> str:
    if r.get("alone_timing") == "bn+data, min(before, after)":
        return (f" ({1000 * r['largest_subnet_step_seconds']:.0f} ms/step with its BatchNorm and the batch's loading, "
                f"the faster of its times before and after retraining: "
                f"{1000 * r['reference_steps_before'][0]:.0f} / {1000 * r['reference_steps_after'][0]:.0f} ms)")
    if r.get("alone_timing") == "bn+data":
        return (f" ({1000 * r['largest_subnet_step_seconds']:.0f} ms/step with its BatchNorm and the batch's loading, "
                "timed at the end of this run)")
    return " (its step timed with BatchNorm folded and without the batch's loading)"  # results before that fix


def parse_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """--set FIELD=VALUE pairs as SteppingConfig keywords, checked before anything runs."""
    settings = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in SteppingConfig.__dataclass_fields__:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD a SteppingConfig field")
        try:
            settings[field] = json.loads(value)
        except json.JSONDecodeError:
            settings[field] = value  # a bare string such as --set quota=adaptive
    try:
        SteppingConfig(**settings)
    except (TypeError, ValueError) as err:
        parser.error(f"--set: {err}")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="lenet-5:fashion-mnist,lenet-5:cifar10", help="model:data[:schedule],...")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--runs", default="runs/original", help="where the original networks live")
    parser.add_argument("--seed", type=int, default=0)
    for flag, key in (("--iterations", "iterations"), ("--batches", "batches_per_iteration"),
                      ("--retrain-epochs", "retrain_epochs"), ("--teacher-epochs", "teacher_epochs")):
        parser.add_argument(flag, type=int, default=None, dest=key, help=f"override the preset's {key}")
    parser.add_argument("--retrain-lr", type=float, default=None, help="retraining LR (default: the preset's lr)")
    parser.add_argument("--retrain-warmup-epochs", type=float, default=None,
                        help="linear LR warm-up over this many retraining epochs (default 0)")
    parser.add_argument("--retrain-tag-update", choices=("sum", "mean"), default=None,
                        help="how retraining combines the subnets' gradients on a shared weight (default sum: the paper)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="settings",
                        help="any other SteppingConfig field, VALUE as JSON (e.g. --set promote=true); repeatable")
    parser.add_argument("--budgets", choices=("ours", "paper"), default="ours",
                        help="ours: 15/30/60/85 %% style budgets per model; paper: the MAC fractions Table I reports, "
                             "so each subnet lands at or below the paper's")
    parser.add_argument("--stem", default="stepping_table1")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming the checkpoints in "
                                                               "runs/stepping/<model>-<data>-<schedule>")
    args = parser.parse_args()
    settings = parse_settings(parser, args.settings)
    command = "python " + " ".join(sys.argv)
    print(command, flush=True)
    results = []
    for job in args.jobs.split(","):
        model_name, data_name, *rest = job.split(":")
        schedule = rest[0] if rest else "joint"
        preset = dict(PRESETS[args.preset][model_name])
        preset.update({k: getattr(args, k) for k in ("iterations", "batches_per_iteration", "retrain_epochs",
                                                       "teacher_epochs", "retrain_lr", "retrain_warmup_epochs",
                                                       "retrain_tag_update")
                       if getattr(args, k) is not None})
        preset["settings"] = settings
        if args.budgets == "paper" and (model_name, data_name) not in PAPER:
            raise SystemExit(f"--budgets paper: Table I has no row for {model_name} on {data_name}")
        results.append(run_job(model_name, data_name, preset, schedule, Path(args.runs), args.seed,
                               resume=not args.fresh, paper_budgets=args.budgets == "paper"))
        report.write(ROOT / "results", args.stem, render(results, command, args.preset),
                     {"command": command, "preset": args.preset, "machine": report.machine(), "results": results})
    print(render(results, command, args.preset))


if __name__ == "__main__":
    main()
