"""LC-Net vs the static backbone: accuracy, mean MACs per image and measured latency ratios.

Trains (CPU presets, ~20-30 minutes each on 2 idle cores):
  1. the static backbone for E epochs (and, as the pretrained nets' reference, F more epochs),
  2. LC-Net from scratch for E epochs (joint, L1 = --scratch-l1),
  3. LC-Net on the trained static backbone + L1 at several strengths, F more epochs each,
then evaluates every LC-Net in both gate schedules (parallel / sequential share weights and
accuracy; they differ in the control nets' MACs and latency) and times the real-skipping
runtime at each batch size against the static backbone run through the same folded-BN code
(both in NCHW and channels_last; each ratio uses the faster static layout). Latency is the
median over interleaved repeats of one pass over a fixed set of test images.

    python benchmarks/lcnet.py --preset fashion-mnist
    python benchmarks/lcnet.py --preset cifar10
    python benchmarks/lcnet.py --preset tiny --results /tmp/lcnet-smoke   # seconds, smoke test

Trained runs are kept under --runs and resumed if the script is interrupted (--fresh retrains).
Writes <results>/lcnet_<data>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import dyninfer as dy
from dyninfer import report
from dyninfer.methods import lcnet

ROOT = Path(__file__).resolve().parent

PRESETS = {
    # smoke test only: seconds
    "tiny": dict(data="digits", model="resnet-20", expansion=0.25, train_subset=512, epochs=1, finetune_epochs=1,
                 batch_size=64, scratch_l1=1.0, l1s=(0.5, 2.0), batches=(1, 8, 32), latency_images=32, repeats=2),
    # ~20-30 min on 2 idle cores each: 2E + 4F = 22 passes over 20k (cifar10: 16k, 1.3x the MACs)
    # images, resnet-20 training at ~350-450 images/s there; ~3-5 min of latency measurements
    "fashion-mnist": dict(data="fashion-mnist", model="resnet-20", expansion=1.0, train_subset=20000, epochs=5,
                          finetune_epochs=3, batch_size=128, scratch_l1=1.0, l1s=(0.3, 1.0, 3.0),
                          batches=(1, 8, 128), latency_images=128, repeats=5),
    "cifar10": dict(data="cifar10", model="resnet-20", expansion=1.0, train_subset=16000, epochs=5,
                    finetune_epochs=3, batch_size=128, scratch_l1=1.0, l1s=(0.3, 1.0, 3.0),
                    batches=(1, 8, 128), latency_images=128, repeats=5),
}
STRATEGIES = ("group", "union", "split", "dense")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def subset(data, n: int, seed: int = 0):
    if n >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.subset(order.sort().values)


# ----------------------------------------------------------------------------- training


def train_static(p, train_set, test_set, runs: Path, resume: bool):
    torch.manual_seed(0)
    model = dy.models.create(p["model"], num_classes=train_set.num_classes, expansion=p["expansion"],
                             input_shape=train_set.input_shape)
    config = dy.train.TrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=0.05, progress=False)
    history = dy.train.fit(model, train_set, config, out=runs / "static", resume=resume)
    return model.eval(), {"top1": dy.train.evaluate(model, test_set)["top1"], "seconds": _seconds(history)}


def _seconds(history) -> float:
    """Training time from fit's per-epoch records (right also when a run was resumed)."""
    return float(sum(h["seconds"] for h in history))


def train_lcnet(p, backbone, train_set, test_set, out: Path, config: lcnet.LCTrainConfig, resume: bool):
    torch.manual_seed(0)
    net = lcnet.wrap(backbone)
    history = lcnet.train(net, train_set, config, out=out, resume=resume)
    return net.eval(), {"seconds": _seconds(history)}


# ----------------------------------------------------------------------------- latency


def executed_macs(table: lcnet.MacTable, saliencies, batch: int, strategy: str, mode: str) -> float:
    """Mean MACs per image the runtime executes with ``strategy`` at ``batch``."""
    n = saliencies[0][0].shape[0]
    total = sum(table.batch_macs([(s_l[i:i + batch], s_c[i:i + batch]) for s_l, s_c in saliencies], mode, strategy)
                for i in range(0, n, batch))
    return total / n


def strategies_at(batch: int) -> list[str]:
    """The strategies with their own code path at ``batch`` (at batch 1 union and split are group)."""
    return ["group", "dense"] if batch == 1 else list(STRATEGIES)


def time_pass(fn, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i:i + batch])
    return time.perf_counter() - start


def measure_latency(static_model, nets: dict, x: torch.Tensor, batches, repeats: int) -> dict:
    """Median seconds per pass over ``x`` for each configuration, interleaved across repeats."""
    configs = {}
    for layout in ("nchw", "channels_last"):
        rt = lcnet.compile_static(static_model, channels_last=layout == "channels_last")
        configs[("static", "-", "-", layout)] = rt
        for name, net in nets.items():
            for mode in lcnet.MODES:
                configs[(name, mode, None, layout)] = net.compile(mode, channels_last=layout == "channels_last")
    results = {}
    for batch in batches:
        runs = []
        for (name, mode, _, layout), rt in configs.items():
            strategies = ["-"] if name == "static" else strategies_at(batch)
            for s in strategies:
                fn = rt if name == "static" else (lambda rt, s: lambda xb: rt(xb, strategy=s))(rt, s)
                runs.append(((name, mode, s, layout, batch), fn))
        times = {key: [] for key, _ in runs}
        for key, fn in runs:  # warm-up
            time_pass(fn, x[:max(batch, 1)], batch)
        for r in range(repeats):
            order = runs if r % 2 == 0 else runs[::-1]
            for key, fn in order:
                times[key].append(time_pass(fn, x, batch))
        for key, ts in times.items():
            results[key] = statistics.median(ts)
        print(f"  timed batch {batch}: {len(runs)} configurations x {repeats} repeats", flush=True)
    return results


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=None, help="E: static and from-scratch epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="F: pretrained+L1 epochs")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--l1s", type=_floats, default=None, help="pretrained+L1 strengths, e.g. 0.3,1,3")
    parser.add_argument("--scratch-l1", type=float, default=None)
    parser.add_argument("--batches", type=_ints, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs", default=None, help="where trained runs are kept (default runs/lcnet-<preset>)")
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--fresh", action="store_true", help="retrain instead of resuming runs")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    for key in ("epochs", "finetune_epochs", "train_subset", "l1s", "scratch_l1", "batches", "repeats"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(sys.argv)
    print(command, flush=True)
    runs = Path(args.runs or f"runs/lcnet-{args.preset}")
    resume = not args.fresh
    wall = time.perf_counter()

    train_full, test_set = dy.data.load(p["data"])
    train_set = subset(train_full, p["train_subset"])
    shape = train_set.input_shape
    print(f"{p['data']}: {len(train_set)} of {len(train_full)} training images, {len(test_set)} test", flush=True)

    static, static_info = train_static(p, train_set, test_set, runs, resume)
    backbone_macs = dy.cost.macs(static, shape)
    print(f"static {p['model']}: top-1 {100 * static_info['top1']:.2f} % ({static_info['seconds']:.0f} s)", flush=True)
    # the pretrained+L1 nets train F more epochs: the static net fine-tuned as long is their reference
    tuned = copy.deepcopy(static)
    config = dy.train.TrainConfig(epochs=p["finetune_epochs"], batch_size=p["batch_size"], lr=lcnet.PRETRAINED_LR,
                                  progress=False)
    history = dy.train.fit(tuned, train_set, config, out=runs / "static-finetuned", resume=resume)
    tuned_info = {"top1": dy.train.evaluate(tuned.eval(), test_set)["top1"], "seconds": _seconds(history)}
    print(f"static fine-tuned: top-1 {100 * tuned_info['top1']:.2f} % ({tuned_info['seconds']:.0f} s)", flush=True)

    base = lcnet.LCTrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], progress=False)
    jobs = [(f"scratch-l1={p['scratch_l1']:g}", "scratch", p["scratch_l1"], None,
             replace(base, l1_layer=p["scratch_l1"], l1_channel=p["scratch_l1"]))]
    for l1 in p["l1s"]:
        jobs.append((f"pretrained-l1={l1:g}", "pretrained", l1, static,
                     replace(base, epochs=p["finetune_epochs"], lr=lcnet.PRETRAINED_LR,
                             control_lr=lcnet.PRETRAINED_CONTROL_LR, l1_layer=l1, l1_channel=l1)))
    nets, rows = {}, []
    for name, kind, l1, backbone, config in jobs:
        if backbone is None:
            torch.manual_seed(0)
            backbone = dy.models.create(p["model"], num_classes=train_set.num_classes, expansion=p["expansion"],
                                        input_shape=shape)
        net, info = train_lcnet(p, backbone, train_set, test_set, runs / name, config, resume)
        nets[name] = net
        row = {"name": name, "kind": kind, "l1": l1, "config": config.to_dict(), "train_seconds": info["seconds"],
               "epochs_total": config.epochs + (p["epochs"] if kind == "pretrained" else 0)}
        summary = lcnet.evaluate(net, test_set).summary()  # decisions are the same in both modes
        for mode in lcnet.MODES:
            row[mode] = {**summary, "mode": mode, "mac_fraction_mean": summary["mac_fraction_mean_by_mode"][mode]}
        rows.append(row)
        s = row["parallel"]
        print(f"{name}: top-1 {100 * s['top1']:.2f} %, MACs {100 * s['mac_fraction_mean']:.1f} % (parallel), "
              f"{100 * row['sequential']['mac_fraction_mean']:.1f} % (sequential) ({info['seconds']:.0f} s)", flush=True)

    # latency on a fixed set of test images
    x = next(test_set.batches(p["latency_images"]))[0]
    agreement = {}
    for name, net in nets.items():
        with torch.no_grad():
            ref = net(x)
        agreement[name] = max(float((net.compile(mode)(x, strategy=s) - ref).abs().max())
                              for mode in lcnet.MODES for s in STRATEGIES)
    timing = measure_latency(static, nets, x, p["batches"], p["repeats"])
    latency = []
    for batch in p["batches"]:
        static_times = {layout: timing[("static", "-", "-", layout, batch)] for layout in ("nchw", "channels_last")}
        best_static = min(static_times.values())
        latency.append({"name": "static", "mode": "-", "strategy": "-", "batch": batch,
                        "ms_per_image": 1e3 * best_static / len(x), "static_ms_per_image": {
                            k: 1e3 * v / len(x) for k, v in static_times.items()}, "ratio": 1.0})
        for name, net in nets.items():
            table = net.mac_table(shape)
            sal = net.saliencies(x)
            for mode in lcnet.MODES:
                for s in strategies_at(batch):
                    per_layout = {layout: timing[(name, mode, s, layout, batch)] for layout in ("nchw", "channels_last")}
                    layout = min(per_layout, key=per_layout.get)
                    latency.append({
                        "name": name, "mode": mode, "strategy": s, "batch": batch, "layout": layout,
                        "ms_per_image": 1e3 * per_layout[layout] / len(x), "ratio": per_layout[layout] / best_static,
                        "ratio_by_layout": {k: v / best_static for k, v in per_layout.items()},
                        "executed_mac_fraction": executed_macs(table, sal, batch, s, mode) / backbone_macs})

    machine = report.machine()
    acc_table = report.markdown_table(
        ["network", "epochs", "top-1 (%)", "MACs parallel (%)", "MACs sequential (%)", "min-max per image (%)",
         "blocks kept (%)", "train s"],
        [("static backbone", p["epochs"], f"{100 * static_info['top1']:.2f}", "100", "100", "100", "100",
          f"{static_info['seconds']:.0f}"),
         ("static, fine-tuned like pretrained+L1", p["epochs"] + p["finetune_epochs"],
          f"{100 * tuned_info['top1']:.2f}", "100", "100", "100", "100", f"{tuned_info['seconds']:.0f}")]
        + [(r["name"], r["epochs_total"], f"{100 * r['parallel']['top1']:.2f}",
            f"{100 * r['parallel']['mac_fraction_mean']:.1f}", f"{100 * r['sequential']['mac_fraction_mean']:.1f}",
            f"{100 * r['parallel']['mac_fraction_min']:.1f}-{100 * r['parallel']['mac_fraction_max']:.1f}",
            f"{100 * statistics.mean(r['parallel']['keep_rate'].values()):.1f}", f"{r['train_seconds']:.0f}")
           for r in rows])
    lat_rows = []
    for name in nets:
        for mode in lcnet.MODES:
            for s in STRATEGIES:
                cells = []
                for batch in p["batches"]:
                    if s not in strategies_at(batch):
                        cells.append("= group")  # one input: the same execution as group
                        continue
                    hit = [r for r in latency if (r["name"], r["mode"], r["batch"], r["strategy"]) == (name, mode, batch, s)]
                    cells.append(f"{hit[0]['ratio']:.2f} ({100 * hit[0]['executed_mac_fraction']:.0f} %)" if hit else "-")
                lat_rows.append((name, mode, s, *cells))
    winners = []
    for s in STRATEGIES:
        cells = []
        for batch in p["batches"]:
            ratios = [r["ratio"] for r in latency if r["name"] != "static" and r["batch"] == batch
                      and r["strategy"] == (s if s in strategies_at(batch) else "group")]
            cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        winners.append((s, *cells))
    win_table = report.markdown_table(["strategy (median over nets and modes)"]
                                      + [f"batch {b}" for b in p["batches"]], winners)
    static_ms = [f"{r['ms_per_image']:.3f}" for r in latency if r["name"] == "static"]
    # issue target: at batch 1, sequential configuration, the latency saved is >= 70 % of the MACs saved
    saving_rows = []
    for r in latency:
        if r["batch"] == 1 and r["mode"] == "sequential" and r["strategy"] == "group":
            mac_saving, time_saving = 1 - r["executed_mac_fraction"], 1 - r["ratio"]
            saving_rows.append((r["name"], f"{100 * mac_saving:.1f}", f"{100 * time_saving:.1f}",
                                f"{time_saving / mac_saving:.2f}" if mac_saving > 0 else "-",
                                ("yes" if time_saving >= 0.7 * mac_saving else "no") if mac_saving > 0 else "-"))
    saving_table = report.markdown_table(["network", "MACs saved (%)", "latency saved (%)", "latency / MAC saving",
                                          ">= 0.70"], saving_rows)
    lat_table = report.markdown_table(["network", "mode", "strategy"] + [f"batch {b}" for b in p["batches"]], lat_rows)
    md = f"""# LC-Net vs static {p['model']} on {p['data']}

Command: `{command}`

Machine: {machine}

Preset `{args.preset}`: {len(train_set)} training images (seeded subset of {len(train_full)}), {len(test_set)} test
images; static and from-scratch nets E = {p['epochs']} epochs, pretrained+L1 nets fine-tune the static net for
F = {p['finetune_epochs']} more epochs (backbone lr {lcnet.PRETRAINED_LR}, control nets {lcnet.PRETRAINED_CONTROL_LR}; the
static net fine-tuned F epochs at lr {lcnet.PRETRAINED_LR} is their reference); from scratch lr 0.05 for both. SGD Nesterov 0.9, wd 5e-4, cosine, batch {p['batch_size']}. Loss = CE + L1 x
(mean S_L + mean S_C). MACs are per image as executed, control nets included, relative to the static backbone
({backbone_macs:,} MACs). The paper's two configurations share weights, so their accuracy is the same: parallel
runs the gates beside each block's conv1, so conv1 is computed in full and only conv2's work is saved;
sequential waits for the gates, so a skipped block runs no convolution and conv1 computes only active channels
(and the C-Net of a skipped block does not run).

{acc_table}

## Latency vs the static backbone (ratio of medians, {p['repeats']} interleaved repeats, {len(x)} test images)

Each cell: LC-Net time / static time at that batch size (faster layout of each; static through the same
folded-BN runtime, {', '.join(static_ms)} ms per image at batch {', '.join(map(str, p['batches']))}), and in
parentheses the MACs that strategy executes as % of the static backbone (`MacTable.batch_macs`, equal to
FlopCounterMode on the runtime in the tests). At batch 1, union and split run the same code as group (one
input, one decision: "= group"); "dense" computes everything and multiplies (what masking costs) and is timed
on its own.
Runtime vs masked reference, max |logit diff|: {max(agreement.values()):.1e}.

{win_table}

{lat_table}

## Speed target: latency saved vs MACs saved, batch 1, sequential configuration (target >= 0.70)

{saving_table}

Total wall time {time.perf_counter() - wall:.0f} s.
"""
    data = {"command": command, "machine": machine, "preset": args.preset, "params": p,
            "backbone_macs": backbone_macs, "static": static_info, "static_finetuned": tuned_info, "lcnet": rows, "latency": latency,
            "runtime_agreement": agreement, "wall_seconds": time.perf_counter() - wall}
    report.write(Path(args.results), f"lcnet_{p['data']}", md, json.loads(json.dumps(data, default=str)))
    print(md)


if __name__ == "__main__":
    main()
