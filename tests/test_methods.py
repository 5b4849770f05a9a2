"""Every registered method on every model family of the zoo (a plain stack and a residual net),
timm-style: the registry is the table, so a method added is tested here for free.

Each built net must: run every subnet; report strictly rising MACs; export subnets that equal the
library's output; and execute the MACs it reports, counted independently by torch's
FlopCounterMode (an incremental session's first answer and, for tagged causal nets, every step).
"""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyninfer import data, export, models
from dyninfer.compare import Setup
from dyninfer.methods.registry import get_method, list_methods
from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime.compaction import as_compact

SHAPE = (1, 8, 8)
MODELS = ["lenet-5", "resnet-20"]
BUDGETS = [0.3, 0.6, 0.9]


@pytest.fixture(scope="module")
def split():
    return data.split(data.synthetic(256, SHAPE, seed=1), 0.25, seed=0)


def setup_for(model: str, train, previous=None) -> Setup:
    reference = models.original_macs(models.create(model, num_classes=train.num_classes, input_shape=SHAPE))
    return Setup(model, train, BUDGETS, steps=8, batch_size=32, seed=0, lr=0.05, reference_macs=reference,
                 previous=previous or {})


def executed(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def dense_of(net, k: int):
    return export.dense(net, k)


def test_the_registry_holds_the_four_papers_baselines():
    assert {"stepping", "slimmable", "us", "anywidth", "earlyexit", "individual", "slice", "slice-ft"} <= set(
        list_methods())
    assert list_methods()[0] == "stepping"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", list_methods())
def test_method_on_model(method, model, split):
    train, test = split
    spec = get_method(method)
    is_flat = model.startswith("lenet")
    if spec.flat_only and not is_flat:
        with pytest.raises((TypeError, ValueError), match="flat"):
            spec.build(setup_for(model, train))
        return
    torch.manual_seed(0)
    net = spec.build(setup_for(model, train))
    assert net.history["optimizer_steps"] == 8
    net.eval()
    fractions = net.mac_fractions()
    assert net.num_subnets == len(fractions) >= 2
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions
    reported = [round(f * net.reference_macs) for f in fractions]
    scratch = net.macs(path="scratch")
    x = test.batches(8).__next__()[0]
    for k in range(1, net.num_subnets + 1):
        logits = net(x, subnet=k)
        assert logits.shape == (8, train.num_classes) and torch.isfinite(logits).all()
        dense = dense_of(net, k).eval()
        torch.testing.assert_close(dense(x), logits, atol=1e-4, rtol=1e-4)
        tagged = getattr(net, "net", None)
        if isinstance(tagged, TaggedNet):  # eval net(x) may run the compacted form export is cut from:
            with torch.no_grad():  # check against the masked training form too, an independent route
                torch.testing.assert_close(dense(x), tagged.eval()(x, subnet=k), atol=1e-4, rtol=1e-4)
        ran = executed(lambda: dense(x[:1]))
        assert ran >= reported[k - 1]  # a dense export never does less than the subnet's MACs
        assert ran == scratch[k - 1], (method, k)  # the from-scratch figure is what the export runs
        if not getattr(getattr(net, "net", None), "incremental", False):
            assert ran == reported[k - 1], (method, k)  # rectangles: what is reported is what runs
    if callable(getattr(net, "start", None)):
        state = {}
        first = executed(lambda: state.setdefault("run", net.start(x[:1])))
        tagged = getattr(net, "net", None)
        if not getattr(tagged, "incremental", False):
            assert first == reported[0]
            return
        # Tagged causal: the dense step blocks also multiply pruned (zero) weights, so what runs is the
        # triangle of the tags with every weight alive; the reported figure leaves the pruned ones out.
        unpruned = copy.deepcopy(tagged)
        for i in range(unpruned.num_hidden + 1):
            unpruned.alive(i).fill_(True)
        triangle = unpruned.macs_per_subnet()
        steps = [executed(lambda: state["run"].step()) for _ in range(net.num_subnets - 1)]
        assert [first] + steps == [triangle[0]] + [b - a for a, b in zip(triangle, triangle[1:])]
        assert all(r <= t for r, t in zip(reported, triangle))


class CountingTeacher(torch.nn.Module):
    """A fixed teacher that counts the batches it scores (on the class: copies count too)."""

    calls: list = []

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        CountingTeacher.calls.append(len(x))
        return torch.linspace(-1, 1, self.num_classes).expand(len(x), -1)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_distils_from_the_comparisons_teacher(method, split):
    """With ``Setup.teacher``, every training batch of every method is scored by the teacher
    (SteppingNet: its retraining, Eq. 4)."""
    train, _ = split
    CountingTeacher.calls = []
    s = setup_for("lenet-5", train)
    s.teacher = CountingTeacher(train.num_classes)
    net = get_method(method).build(s)
    phases, calls = net.history["phases"], CountingTeacher.calls
    distilled = phases.get("retrain", 0) if method.startswith("stepping") else net.history["optimizer_steps"]
    assert distilled >= 1 and len(calls) >= distilled, (phases, len(calls))
    assert all(c == s.batch_size for c in calls)
