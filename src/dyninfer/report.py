"""Reports: markdown and JSON tables, written next to the run that produced them."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch


def machine() -> dict[str, Any]:
    """What a number was measured on: CPU, threads, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    found = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "python": platform.python_version()}
    if os.environ.get("OMP_WAIT_POLICY"):  # PASSIVE makes every small parallel op wake its threads
        found["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    return found


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def subnet_table(accuracies: Sequence[float], fractions: Sequence[float], original: float | None = None,
                 budgets: Sequence[float] | None = None,
                 scratch: Sequence[float] | None = None) -> tuple[str, dict]:
    """Table-I style: original accuracy, then A_k and M_k/M_t for each subnet (percent).

    ``fractions`` are the MACs of the incremental path (what stepping to subnet k executes, live
    weights); ``scratch``, when given, the MACs one from-scratch execution of subnet k multiplies.
    """
    headers = ["", "original"] + [f"subnet {k}" for k in range(1, len(accuracies) + 1)]
    acc_row = ["accuracy A_k (%)", "-" if original is None else f"{100 * original:.2f}"]
    acc_row += [f"{100 * a:.2f}" for a in accuracies]
    mac_row = ["MACs M_k/M_t (%)", "100.00"] + [f"{100 * f:.2f}" for f in fractions]
    rows = [acc_row, mac_row]
    if scratch is not None:
        rows.append(["MACs from scratch (%)", "100.00"] + [f"{100 * f:.2f}" for f in scratch])
    if budgets is not None:
        rows.append(["budget (%)", "-"] + [f"{100 * b:.2f}" for b in budgets])
    data = {"original_accuracy": original, "accuracy": list(accuracies), "mac_fraction": list(fractions),
            "scratch_mac_fraction": None if scratch is None else list(scratch),
            "budgets": None if budgets is None else list(budgets)}
    return markdown_table(headers, rows), data


def write(out: str | Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write ``stem.md`` and ``stem.json`` in ``out`` (atomically, temp file + rename)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.md", out / f"{stem}.json"
    for path, text in zip(paths, (markdown + "\n", json.dumps(data, indent=2, default=str) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def subnet_plot(path: str | Path, accuracies: Sequence[float], fractions: Sequence[float], original: float | None,
                scratch_ms: Sequence[float], step_ms: Sequence[float]) -> Path:
    """Two panels: accuracy vs MACs per subnet (the original network as a reference point), and
    measured latency per subnet from scratch next to the stepping path's running total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = list(range(1, len(accuracies) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot([100 * f for f in fractions], [100 * a for a in accuracies], "o-", label="subnets 1..N")
    for i, f, a in zip(k, fractions, accuracies):
        left.annotate(str(i), (100 * f, 100 * a), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if original is not None:
        left.plot([100], [100 * original], "k*", markersize=10, label="original network")
    left.set_xlabel("MACs (% of the original network)")
    left.set_ylabel("test accuracy (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")  # the original (100 % MACs) sits bottom right on digits
    running = [sum(step_ms[:i]) for i in k]
    width = 0.4
    right.bar([i - width / 2 for i in k], scratch_ms, width, label="subnet k from scratch")
    right.bar([i + width / 2 for i in k], running, width, label="stepping 1 -> k (running total)")
    right.set_xticks(k)
    right.set_xlabel("subnet")
    right.set_ylabel("measured latency (ms)")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path

