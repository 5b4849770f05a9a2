"""The comparison harness: every method on the same model, data, seed and training budget,
evaluated at matched MAC fractions (SteppingNet Fig. 6 style).

    >>> import dyninfer.compare as cmp
    >>> result = cmp.run("lenet-5", "fashion-mnist", methods=["stepping", "slimmable", "earlyexit"],
    ...                  budgets=[0.15, 0.3, 0.6, 0.85], steps=2000, batch_size=128, out="runs/cmp")

The budget is optimizer steps x batch size, the same for every method: each method's loop
counts its own steps (``history["optimizer_steps"]``) and the harness counts every
``optimizer.step()`` independently with a global hook; both must equal ``steps`` or the run
fails. Methods are used only through the common face (``num_subnets``, ``mac_fractions()``,
``forward(x, subnet)``, ``evaluate(data)``, optional ``start(x)``/``step()``), plus a dense
export per subnet for timing (``net.export(k)``, else :func:`dyninfer.export.subnet`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import dyninfer
from dyninfer import checkpoint as ckpt
from dyninfer import cost, export, models, report
from dyninfer import data as data_module
from dyninfer.data import ImageSet
from dyninfer.methods import baselines, nonuniform, stepping  # noqa: F401  (importing a method module registers it)
from dyninfer.methods.budget import checkpointed
from dyninfer.methods.registry import Setup, get_method, list_methods
from dyninfer.methods.stepping import check_budgets
from dyninfer.nn.tagged import fold_module
from dyninfer.report import markdown_table
from dyninfer.train import evaluate as evaluate_model

log = logging.getLogger(__name__)

METHODS = tuple(list_methods())  # every registered method (methods register when their module is imported)
BUILDERS: dict[str, Callable[[Setup], Any]] = {name: get_method(name).build for name in METHODS}
DESCRIPTIONS = {name: get_method(name).description for name in METHODS}
DEFAULT_BUDGETS = (0.15, 0.30, 0.60, 0.85)
MATCH_TOLERANCE = 0.01  # a subnet counts for budget b when its MAC fraction is <= b * (1 + this)


class _StepCounter:
    """Counts every ``optimizer.step()`` in the process while active (torch's global hook)."""

    def __enter__(self) -> "_StepCounter":
        self.count = 0
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, optimizer, args, kwargs) -> None:
        self.count += 1

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------- timing
def _path_fn(method, to: int | None = None) -> Callable[[torch.Tensor], None]:
    """A session from subnet 1 stepping up to subnet ``to`` (default: the largest)."""
    to = method.num_subnets if to is None else to

    def path(x: torch.Tensor) -> None:
        run = method.start(x)
        while run.reached < to and run.can_step():
            run.step()

    return path


@torch.no_grad()
def measure_latency(configs: dict[Any, tuple[Callable[[torch.Tensor], Any], nn.Module | None]], input_shape,
                    batch: int, repeats: int, warmup: int = 2) -> dict[Any, dict]:
    """Median milliseconds per call of each ``fn(x)``, in NCHW and channels_last, interleaved.

    ``configs[key] = (fn, module)``: a module (or None) is converted to channels_last for that
    layout. Returns ``{key: {"ms": faster layout's median, "layout": ..., "nchw_ms", "channels_last_ms"}}``.
    """
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    xs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    runs = []
    for key, (fn, module) in configs.items():
        for layout, xl in xs.items():
            if module is not None and layout == "channels_last":
                converted = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()
                runs.append((key, layout, converted, xl))
            else:
                runs.append((key, layout, fn if module is None else module.eval(), xl))
    times: dict[tuple, list[float]] = {(key, layout): [] for key, layout, _, _ in runs}
    for r in range(warmup + repeats):
        for key, layout, fn, xl in runs:
            start = time.perf_counter()
            fn(xl)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[(key, layout)].append(elapsed * 1e3)
    out = {}
    for key in configs:
        medians = {layout: statistics.median(times[(key, layout)]) for layout in xs}
        best = min(medians, key=medians.get)
        out[key] = {"ms": medians[best], "layout": best, "nchw_ms": medians["nchw"],
                    "channels_last_ms": medians["channels_last"]}
    return out


# ---------------------------------------------------------------------------- the harness
def _resolve_data(data, data_root=None) -> tuple[ImageSet, ImageSet]:
    if isinstance(data, str):

        return data_module.load(data, root=data_root)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, ImageSet) for d in data):
        return data[0], data[1]
    raise ValueError(f"data must be a data set name (e.g. 'fashion-mnist') or a (train, test) pair of ImageSets; "
                     f"got {type(data).__name__}")


def _check_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    unknown = [m for m in methods if m not in BUILDERS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or methods!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct, got {methods}")
    return methods


def matched(fractions: Sequence[float], accuracies: Sequence[float], budget: float,
            tolerance: float = MATCH_TOLERANCE) -> dict | None:
    """The largest subnet whose MAC fraction fits ``budget`` (anytime use), or None."""
    fits = [k for k, f in enumerate(fractions) if f <= budget * (1 + tolerance)]
    if not fits:
        return None
    k = max(fits, key=lambda i: (fractions[i], i))
    return {"subnet": k + 1, "mac_fraction": fractions[k], "accuracy": accuracies[k]}


def run(model_name: str, data, methods: Sequence[str] = METHODS, budgets: Sequence[float] = DEFAULT_BUDGETS,
        steps: int = 1000, batch_size: int = 128, seed: int = 0, out: str | Path | None = None, *,
        lr: float = 0.05, options: dict[str, dict] | None = None, latency_batch: int = 128,
        latency_repeats: int = 9, data_root: str | None = None, stem: str = "compare", progress: bool = False,
        command: str | None = None, teacher: nn.Module | None = None, teacher_name: str | None = None,
        resume: bool = True) -> dict:
    """Train and evaluate every method in ``methods``; returns the result record (also written
    as ``<out>/<stem>.{md,json,png}`` when ``out`` is given).

    ``data`` is a data set name for :func:`dyninfer.data.load` or a (train, test) pair.
    ``options[method]`` holds method-specific settings (``expansion`` for any method, fields
    of its config, SteppingNet's ``construct_fraction``/``iterations``/``teacher_fraction``).
    ``latency_repeats=0`` skips timing. ``teacher`` (e.g. the trained original network) is the
    same distillation teacher for every method: SteppingNet's Eq. 4 in retraining, and
    gamma CE + (1 - gamma) KD for the others (:class:`dyninfer.methods.budget.Supervision`);
    without it every method trains on plain cross-entropy.

    With ``out``, each method's result and trained net are saved as it finishes
    (``<out>/<stem>.partial/``), and a rerun with the same settings (``resume=True``) takes them
    from there instead of training that method again: a late failure loses one method at most.
    ``resume=False`` trains every method anew.
    """

    methods = _check_methods(methods)
    budgets = check_budgets(budgets)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("latency_batch", latency_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 0:
        raise ValueError(f"latency_repeats must be an int >= 0, got {latency_repeats!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ValueError(f"options given for methods not compared: {unknown}")
    for name, opts in options.items():  # every method's options, before the first one trains
        get_method(name).check_options(opts)
        if "at" in opts and opts["at"] not in methods[:methods.index(name)]:
            raise ValueError(f"{name} option at={opts['at']!r} must name a method compared before {name}; "
                             f"before it: {methods[:methods.index(name)]}")
        if teacher is not None and float(opts.get("teacher_fraction", 0) or 0):
            raise ValueError(f"{name}: a comparison teacher is given, so teacher_fraction must be 0")
    if model_name not in models.list_models():
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(models.list_models())}")
    train, test = _resolve_data(data, data_root)
    if len(train) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training samples")
    original = models.create(model_name, num_classes=train.num_classes, expansion=1.0, input_shape=train.input_shape)
    flat_only = [m for m in methods if m in METHODS and get_method(m).flat_only]
    if not isinstance(original, nn.Sequential) and flat_only:
        raise ValueError(f"{', '.join(flat_only)} need(s) a flat nn.Sequential zoo model (lenet-5, lenet-3c1l, "
                         f"vgg-16); {model_name} is a {type(original).__name__}: compare it without them")
    reference = cost.macs(original, train.input_shape)
    teacher_record = None
    if teacher is not None:  # check it before any training: it must score this data's classes
        teacher.eval()
        with torch.no_grad():
            scores = teacher(next(train.batches(2))[0])
        if scores.shape != (2, train.num_classes):
            raise ValueError(f"the teacher gives outputs of shape {tuple(scores.shape[1:])} per image; this data has "
                             f"{train.num_classes} classes")

        teacher_record = {"name": teacher_name, "test_top1": float(evaluate_model(teacher, test)["top1"])}

    results: dict[str, dict] = {}
    nets: dict[str, Any] = {}
    cache = _PartialResults(out, stem, {
        "model": model_name, "data": _data_key(train), "test": _data_key(test), "budgets": budgets, "steps": steps,
        "batch_size": batch_size, "seed": seed, "lr": lr, "code": _code_key(),
        "teacher": ckpt.fingerprint(teacher.state_dict()) if teacher is not None else None}) if out is not None else None
    for name in methods:
        setup = Setup(model_name, train, budgets, steps, batch_size, seed, lr, reference, progress,
                      dict(options.get(name, {})), {n: r["mac_fractions"] for n, r in results.items()}, teacher)
        key = {"options": options.get(name, {}), "before": {n: r["mac_fractions"] for n, r in results.items()}}
        found = cache.load(name, key) if cache is not None and resume else None
        if found is not None:
            results[name], nets[name] = found
            net = nets[name].eval()  # what is computed from the net, not trained, is computed again here
            results[name].update(accuracy=[float(a) for a in net.evaluate(test)],
                                 mac_fractions=[float(f) for f in net.mac_fractions()],
                                 scratch_mac_fractions=[float(f) for f in net.mac_fractions(path="scratch")],
                                 resumed=True)
            log.info("%s: resumed from %s (trained by an earlier run with these settings)", name, cache.folder)
            continue
        log.info("%s: training (%d steps x %d)", name, steps, batch_size)
        start = time.perf_counter()
        work = cache.work_folder(name, key, fresh=not resume) if cache is not None else None
        with _StepCounter() as counter, (checkpointed(work, cache.work_key(key)) if work is not None
                                         else contextlib.nullcontext(lambda: 0)) as resumed_steps:
            net = BUILDERS[name](setup)
            resumed = resumed_steps()
        seconds = time.perf_counter() - start
        history = getattr(net, "history", {}) or {}
        reported, samples = history.get("optimizer_steps"), history.get("samples")
        broken = None
        if not (counter.count + resumed == reported == steps):
            broken = (f"{name} broke the training budget: {steps} optimizer steps were allotted, its log reports "
                      f"{reported} and {counter.count} optimizer.step() calls were counted"
                      + (f" after {resumed} taken from its checkpoints" if resumed else ""))
        elif samples != steps * batch_size:
            broken = f"{name} trained on {samples} samples; the budget is {steps} x {batch_size}"
        if broken:
            if work is not None:  # what broke the budget must not be resumed as if it had not
                shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(broken)
        if resumed:
            log.info("%s: %d of its %d steps were taken from the checkpoints of an interrupted run", name, resumed,
                     steps)
        accuracies = [float(a) for a in net.evaluate(test)]
        fractions = [float(f) for f in net.mac_fractions()]
        scratch = [float(f) for f in net.mac_fractions(path="scratch")]
        incremental = callable(getattr(net, "start", None))
        path = getattr(net, "path_mac_fraction", None)
        results[name] = {
            "description": DESCRIPTIONS[name], "num_subnets": net.num_subnets, "mac_fractions": fractions,
            "scratch_mac_fractions": scratch,
            "accuracy": accuracies, "incremental": incremental,
            "path_mac_fraction": (float(path()) if callable(path) else fractions[-1]) if incremental else None,
            "recompute_mac_fraction": float(sum(scratch)),  # each subnet from scratch: its rectangles
            "optimizer_steps": reported, "counted_optimizer_steps": counter.count, "resumed_steps": resumed,
            "samples": samples,
            "phases": history.get("phases", {}), "train_seconds": seconds,
            # what was trained, as a content hash of the weights: two seeded runs agree on it
            "weights_fingerprint": ckpt.fingerprint(net.state_dict()),
            "details": {k: history[k] for k in ("config", "multipliers", "channels", "expansion", "exits",
                                                "width_range", "stepping_config", "construction_warnings")
                        if k in history},
        }
        nets[name] = net
        if cache is not None:
            if cache.save(name, key, results[name], net) and work is not None:  # saved: checkpoints not needed
                shutil.rmtree(work, ignore_errors=True)
        log.info("%s: %.0f s; MACs %s; accuracy %s", name, seconds, " ".join(f"{f:.3f}" for f in fractions),
                 " ".join(f"{a:.4f}" for a in accuracies))

    if latency_repeats:
        configs: dict[Any, tuple] = {("original", 1): (None, _fold(original))}
        for name, net in nets.items():
            for k in range(1, net.num_subnets + 1):
                configs[(name, k)] = (None, export.dense(net, k))
                if callable(getattr(net, "prefer_faster", None)) and 1 < k < net.num_subnets:
                    configs[(name, "chain", k)] = (_path_fn(net, k), None)  # subnet k as its chain of steps
            if results[name]["incremental"]:
                configs[(name, "path")] = (_path_fn(net), None)
        timed = measure_latency(configs, train.input_shape, latency_batch, latency_repeats)
        base = timed[("original", 1)]["ms"]
        for name, net in nets.items():
            rows = [timed[(name, k)] for k in range(1, net.num_subnets + 1)]
            if callable(getattr(net, "prefer_faster", None)):  # a causal net: rectangle or chain, by measurement
                n = net.num_subnets  # subnet 1's chain is its one pass; subnet N's is the whole path
                chains = [timed[(name, 1) if k == 1 else (name, "path") if k == n else (name, "chain", k)]
                          for k in range(1, n + 1)]
                net.prefer_faster([r["ms"] for r in rows], [c["ms"] for c in chains])
                rows = [c if e == "chain" else r for r, c, e in zip(rows, chains, net.scratch_execution)]
                results[name]["scratch_mac_fractions"] = [float(f) for f in net.mac_fractions(path="scratch")]
                results[name]["recompute_mac_fraction"] = float(sum(results[name]["scratch_mac_fractions"]))
            results[name]["scratch_execution"] = list(getattr(net, "scratch_execution", ["dense"] * net.num_subnets))
            results[name]["latency_ms"] = [r["ms"] for r in rows]
            results[name]["latency_layout"] = [r["layout"] for r in rows]
            results[name]["latency_vs_original"] = [r["ms"] / base for r in rows]
            results[name]["scratch_latency_sum_ms"] = sum(r["ms"] for r in rows)
            if results[name]["incremental"]:
                results[name]["path_latency_ms"] = timed[(name, "path")]["ms"]
        original_latency = timed[("original", 1)]
    else:
        original_latency = None

    table = {name: {str(b): matched(r["mac_fractions"], r["accuracy"], b) for b in budgets}
             for name, r in results.items()}
    table_scratch = {name: {str(b): matched(r["scratch_mac_fractions"], r["accuracy"], b) for b in budgets}
                     for name, r in results.items()}
    record = {
        "model": model_name, "data": train.name, "train_n": len(train), "test_n": len(test),
        "input_shape": list(train.input_shape), "budgets": budgets, "steps": steps, "batch_size": batch_size,
        "samples_per_method": steps * batch_size, "seed": seed, "lr": lr, "reference_macs": reference,
        "options": options, "match_tolerance": MATCH_TOLERANCE, "teacher": teacher_record,
        "latency": {"batch": latency_batch, "repeats": latency_repeats, "original": original_latency},
        "machine": report.machine(), "command": command, "methods": results, "matched": table,
        "matched_scratch": table_scratch,
    }
    if out is not None:
        record["files"] = [str(p) for p in write(record, out, stem)]
    return record


def _data_key(data: ImageSet) -> dict:
    return {"name": data.name, "n": len(data), "shape": list(data.input_shape), "classes": data.num_classes,
            "mean": json.loads(json.dumps(data.mean, default=str)), "std": json.loads(json.dumps(data.std, default=str)),
            "augmentation": str(data.augmentation),
            "tensors": ckpt.fingerprint({"x": torch.as_tensor(data.images), "y": torch.as_tensor(data.labels)})}


def _code_key() -> dict:
    """dyninfer's source and torch's version: a result from other code is not resumed."""
    digest = hashlib.sha256()
    for path in sorted(Path(dyninfer.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return {"dyninfer": dyninfer.__version__, "source": digest.hexdigest(), "torch": torch.__version__}


class _PartialResults:
    """Each method's result (JSON) and trained net, saved as it finishes, for resuming a comparison.

    The net is a pickle (``torch.save`` of the whole module: a method's net has no other
    complete serialisation), loaded back only by this cache, only from the folder this
    comparison writes, and only when every setting (data and test images, code and torch
    versions included) matches what was saved. The SHA-256 next to it detects a damaged file,
    not a tampered one: this is a resume cache for its own run, never a file to share or to
    load from elsewhere (``dyninfer export`` writes files to share). Accuracy and MACs are
    recomputed from a resumed net; its training time and logs are the earlier run's.
    """

    def __init__(self, out: str | Path, stem: str, settings: dict):
        self.folder = Path(out) / f"{stem}.partial"
        self.settings = json.loads(json.dumps(settings, default=str))

    def work_key(self, key: dict) -> dict:
        return {"settings": self.settings, "key": key}

    def work_folder(self, name: str, key: dict, fresh: bool) -> Path:
        """Where ``name`` checkpoints while it trains (``<stem>.partial/<name>.work``): resumed by a
        rerun with the same settings, removed once the method's result is saved."""
        folder = self.folder / f"{name}.work"
        if fresh and folder.exists():
            shutil.rmtree(folder)
        return folder

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.json", self.folder / f"{name}.pt"

    def load(self, name: str, key: dict):
        """(result, net) saved for ``name`` under these settings, or None (then it trains again)."""
        meta_path, net_path = self._paths(name)
        if not meta_path.exists() or not net_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("settings") != self.settings or meta.get("key") != json.loads(json.dumps(key, default=str))
                    or meta.get("sha256") != hashlib.sha256(net_path.read_bytes()).hexdigest()):
                return None
            return meta["result"], torch.load(net_path, weights_only=False)
        except Exception as err:  # a damaged or unreadable entry: train again
            log.warning("%s: saved result in %s not usable (%s); training it again", name, self.folder, err)
            return None

    def save(self, name: str, key: dict, result: dict, net) -> bool:
        """Best effort: a net that cannot be saved (not picklable, disk full) is simply not resumable.
        Returns whether both files were written."""
        meta_path, net_path = self._paths(name)
        tmp_net = tmp_meta = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for module in net.modules():  # inference caches (closures) are rebuilt on demand: not saved
                module._modules.pop("_compact", None)
                module.__dict__.pop("_compact", None)
                module.__dict__.pop("_compact_key", None)
            tmp_net = ckpt._temp_in(self.folder, net_path.name)
            torch.save(net, tmp_net)
            digest = hashlib.sha256(tmp_net.read_bytes()).hexdigest()
            tmp_meta = ckpt._temp_in(self.folder, meta_path.name)
            tmp_meta.write_text(json.dumps({"settings": self.settings, "key": key, "sha256": digest,
                                            "result": result}, indent=1, default=str))
            tmp_net.replace(net_path)
            tmp_meta.replace(meta_path)
            return True
        except Exception as err:
            log.warning("%s: not saved for resuming (%s)", name, err)
            for tmp in (tmp_net, tmp_meta):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            return False


def _fold(model: nn.Module) -> nn.Module:

    return fold_module(model.eval())


# ---------------------------------------------------------------------------- outputs
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(record: dict) -> str:

    budgets = record["budgets"]
    methods = record["methods"]
    machine = record["machine"]
    lines = [f"# {record['model']} on {record['data']}: dynamic-width methods at matched MACs", ""]
    if record.get("command"):
        lines += [f"Command: `{record['command']}`", ""]
    lines += [
        f"Every method trained for {record['steps']} optimizer steps x batch {record['batch_size']} "
        f"= {record['samples_per_method']:,} samples (counted by each method and by a global optimizer hook), "
        f"seed {record['seed']}, SGD lr {record['lr']} (cosine), {record['train_n']} training / "
        f"{record['test_n']} test images. MACs are fractions of the original {record['model']} "
        f"({record['reference_macs']:,} MACs). Weight decay 5e-4 means the same in every method: each live "
        f"weight decays once per batch (torch's SGD weight_decay), however many subnets share it. "
        + (f"Every method distils from the same teacher, {record['teacher']['name'] or 'given'} "
           f"({100 * record['teacher']['test_top1']:.2f} % test top-1): Eq. 4 for SteppingNet's retraining, "
           f"0.4 CE + 0.6 KD for the others (for US-Nets and non-uniform subnets, their largest width; the smaller "
           f"ones keep their in-place KD from it)." if record.get("teacher") else "No teacher: every method trains on "
           "cross-entropy."),
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}.", "",
        "## Test accuracy (%) at matched MAC budgets", "",
        f"Cell: accuracy of the largest subnet whose MACs are within the budget "
        f"(+{100 * record['match_tolerance']:.0f} %), with its MAC % in brackets; '-' when none fits.", "",
    ]
    def matched_rows(key: str) -> list[list[str]]:
        rows = []
        for name in methods:
            row = [name]
            for b in budgets:
                m = record[key][name][str(b)]
                row.append("-" if m is None else f"{100 * m['accuracy']:.2f} ({100 * m['mac_fraction']:.1f})")
            rows.append(row)
        return rows

    headers = ["method"] + [f"{100 * b:g} % MACs" for b in budgets]
    lines += ["By the MACs of subnet k's live weights on the incremental path (stepping up to it; its dense "
              "step blocks also multiply pruned weights as zeros; for methods without a path, running it):", "", markdown_table(headers, matched_rows("matched")), ""]
    if "matched_scratch" in record:
        lines += ["By the MACs one from-scratch execution of subnet k multiplies, the one timed below: its dense "
                  "export (a causal net's zero upper blocks and pruned weights count), or for a causal net whose "
                  "chain of step blocks (a session 1 -> k) was measured faster, that chain (the causal triangle, "
                  "pruned weights included):", "",
                  markdown_table(headers, matched_rows("matched_scratch")), ""]

    timed = "latency_ms" in next(iter(methods.values()))
    lines += ["## Every subnet", ""]
    if timed:
        lat = record["latency"]
        lines += [f"Latency: median of {lat['repeats']} interleaved runs at batch {lat['batch']} of the from-scratch "
                  f"execution ('as': the dense export, BatchNorm folded, or a causal net's chain of steps where that "
                  f"was measured faster; the faster of NCHW and channels_last), on a shared, noisy machine: "
                  f"compare ratios, not absolute times. Original network: {lat['original']['ms']:.3f} ms "
                  f"({lat['original']['layout']}). SteppingNet's dense blocks keep pruned weights as zeros.", ""]
    rows = []
    for name, r in methods.items():
        for k in range(r["num_subnets"]):
            row = [name, k + 1, _pct(r["mac_fractions"][k]),
                   _pct(r["scratch_mac_fractions"][k]) if "scratch_mac_fractions" in r else "-", _pct(r["accuracy"][k])]
            if timed:
                row += [f"{r['latency_ms'][k]:.3f}", f"{r['latency_vs_original'][k]:.3f}", r["latency_layout"][k],
                        r.get("scratch_execution", ["dense"] * r["num_subnets"])[k]]
            rows.append(row)
    headers = ["method", "subnet", "MACs % (incremental)", "MACs % (from scratch)", "accuracy %"] + (
        ["latency ms (from scratch)", "vs original", "layout", "as"] if timed else [])
    lines += [markdown_table(headers, rows), ""]

    lines += ["## Incremental cost: smallest -> largest subnet", "",
              "Incremental methods step up reusing every earlier activation (path = the stepping path, live weights); "
              "the others recompute each subnet from scratch (sum of all subnets' from-scratch MACs). 'x largest "
              "subnet' divides by one from-scratch pass of the largest subnet. MACs as % of the original network.",
              ""]
    rows = []
    for name, r in methods.items():
        cost_used = r["path_mac_fraction"] if r["incremental"] else r["recompute_mac_fraction"]
        largest = r.get("scratch_mac_fractions", r["mac_fractions"])[-1]  # one from-scratch pass of subnet N
        row = [name, "yes" if r["incremental"] else "no", _pct(r["path_mac_fraction"]),
               _pct(r["recompute_mac_fraction"]), _pct(cost_used), f"{cost_used / largest:.2f}"]
        if timed:
            row += [f"{r['path_latency_ms']:.3f}" if r["incremental"] else "-", f"{r['scratch_latency_sum_ms']:.3f}"]
        rows.append(row)
    headers = ["method", "incremental", "stepping path MACs %", "recompute-all MACs %", "cost of 1->N MACs %",
               "x largest subnet"] + (["path latency ms", "sum of scratch latencies ms"] if timed else [])
    lines += [markdown_table(headers, rows), ""]

    lines += ["## Training budget", ""]
    rows = [[name, r["optimizer_steps"], r["counted_optimizer_steps"], r["samples"],
             f"{r['train_seconds']:.0f}" + (" (resumed: an earlier run's)" if r.get("resumed") else ""),
             ", ".join(f"{p} {n}" for p, n in r["phases"].items())] for name, r in methods.items()]
    lines += [markdown_table(["method", "optimizer steps (own log)", "counted by hook", "samples", "seconds",
                              "phases"], rows), ""]
    lines += ["Methods: " + "; ".join(f"**{n}** {methods[n]['description']}" for n in methods) + "."]
    return "\n".join(lines)


def plot(record: dict, path: str | Path) -> Path:
    """Accuracy vs MAC fraction, one line per method (SteppingNet Fig. 6 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>phX*"
    for i, (name, r) in enumerate(record["methods"].items()):
        ax.plot([100 * f for f in r["mac_fractions"]], [100 * a for a in r["accuracy"]],
                marker=markers[i % len(markers)], label=name)
    for b in record["budgets"]:
        ax.axvline(100 * b, color="0.85", linestyle=":", zorder=0)
    ax.set_xlabel("MACs (% of the original network)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{record['model']} on {record['data']}: {record['steps']} steps x {record['batch_size']} per method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return report.save_figure(fig, path)


def write(record: dict, out: str | Path, stem: str = "compare") -> list[Path]:
    """``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` in ``out``."""

    out = Path(out)
    md, js = report.write(out, stem, markdown(record), {**record, "files": None})
    return [md, js, plot(record, out / f"{stem}.png")]


__all__ = ["METHODS", "BUILDERS", "DEFAULT_BUDGETS", "Setup", "matched", "measure_latency", "markdown", "plot",
           "run", "write"]
