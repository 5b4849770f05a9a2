"""Train original (unexpanded) zoo networks: the baselines and teachers later methods need.

Writes benchmarks/results/train_original.{md,json} with accuracy, wall time and training
throughput (images/s), and keeps each trained run under runs/original/<model>-<data> so the
SteppingNet benchmark can use them as teachers.

    python benchmarks/train_original.py --jobs lenet-5:fashion-mnist:15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dyninfer as dy
from dyninfer import report

ROOT = Path(__file__).resolve().parent


def reuse(out: Path, epochs: int) -> dict | None:
    """A finished run of the same job (run.json written after its last epoch), read back."""
    if not (out / "run.json").exists():
        return None
    meta = json.loads((out / "run.json").read_text())
    if meta.get("epochs_run") != epochs:
        return None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"meta": meta, "history": history}


def run_job(model_name: str, data_name: str, epochs: int, runs: Path, lr: float | None, warmup_epochs: float) -> dict:
    out = runs / f"{model_name}-{data_name}"
    done = reuse(out, epochs)
    if done is not None:
        meta, history = done["meta"], done["history"]
        ips = sorted(h["images_per_s"] for h in history)
        return {"model": model_name, "data": data_name, "epochs": epochs, "test_top1": meta["test"]["top1"],
                "seconds": meta["seconds"], "images_per_s_median": ips[len(ips) // 2], "images_per_s_min": ips[0],
                "images_per_s_max": ips[-1], "run": str(out), "reused": True}
    train_set, test_set = dy.data.load(data_name)
    model = dy.models.create(model_name, num_classes=train_set.num_classes, input_shape=train_set.input_shape)
    # Warm-up: without it LeNet-3C1L collapses at lr 0.05 (loss stuck at ln 10 after the first
    # step's gradient norm of ~11); a linear ramp over the first epoch trains it normally.
    warmup = round(warmup_epochs * -(-len(train_set) // 128))
    config = dy.train.TrainConfig(epochs=epochs, batch_size=128, lr=lr, warmup_steps=warmup, progress=False)
    start = time.perf_counter()
    history = dy.train.fit(model, train_set, config, test=test_set, out=out, resume=False)
    seconds = time.perf_counter() - start
    result = dy.train.evaluate(model, test_set)
    meta = {"kind": "train", "model": model_name, "data": data_name, "data_root": None,
            "num_classes": train_set.num_classes, "expansion": 1.0, "input_shape": list(train_set.input_shape),
            "train_config": config.to_dict(), "test": result, "seconds": seconds, "epochs_run": len(history)}
    (out / "run.json").write_text(json.dumps(meta, indent=2))
    ips = sorted(h["images_per_s"] for h in history)
    return {"model": model_name, "data": data_name, "epochs": epochs, "test_top1": result["top1"],
            "seconds": seconds, "images_per_s_median": ips[len(ips) // 2], "images_per_s_min": ips[0],
            "images_per_s_max": ips[-1], "run": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="lenet-5:fashion-mnist:15", help="model:data:epochs,...")
    parser.add_argument("--runs", default="runs/original")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-epochs", type=float, default=0.0,
                        help="linear LR warm-up over this many epochs (1 lets LeNet-3C1L train at lr 0.05)")
    parser.add_argument("--stem", default="train_original")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    print(command, flush=True)
    rows = []
    for job in args.jobs.split(","):
        model_name, data_name, epochs = job.split(":")
        rows.append(run_job(model_name, data_name, int(epochs), Path(args.runs), args.lr, args.warmup_epochs))
        print(json.dumps(rows[-1]), flush=True)
    table = report.markdown_table(
        ["model", "data", "epochs", "test top-1 (%)", "wall time (s)", "train images/s (median [min, max] over epochs)"],
        [(r["model"] + (" (reused)" if r.get("reused") else ""), r["data"], r["epochs"], f"{100 * r['test_top1']:.2f}", f"{r['seconds']:.0f}",
          f"{r['images_per_s_median']:.0f} [{r['images_per_s_min']:.0f}, {r['images_per_s_max']:.0f}]") for r in rows])
    machine = report.machine()
    md = (f"# Original networks\n\nCommand: `{command}`\n\nMachine: {machine}\n\n{table}\n\n"
          f"Training: SGD Nesterov 0.9, lr {args.lr if args.lr is not None else 0.05}, "
          f"linear warm-up over {args.warmup_epochs:g} epochs, cosine, weight decay 5e-4, "
          "batch 128; CIFAR with crop+flip.\n"
          "Throughput includes data augmentation and is measured by the trainer per epoch; "
          "other work on the 2-core machine during the run lowers it (OMP_WAIT_POLICY=PASSIVE was set).\n"
          "Rows marked reused were read back from their finished run directory (same job, same epochs).\n")
    report.write(ROOT / "results", args.stem, md, {"command": command, "machine": machine, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
