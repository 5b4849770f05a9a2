import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyninfer as dy
from dyninfer import checkpoint as ckpt
from dyninfer.data import ImageSet
from dyninfer.train import TrainConfig, evaluate, fit, kd_loss, lr_factor


def stripes(n=64, seed=0, augmentation="none"):
    """Two classes a tiny conv net separates in a few steps: bright left half vs right half.

    With "crop-flip" the flips make the labels noise: fine where only determinism matters.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 90, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    left = labels == 0
    images[left, :, :, :4] += 120
    images[~left, :, :, 4:] += 120
    return ImageSet(images, labels, num_classes=2, name="stripes", augmentation=augmentation)


class Net(nn.Module):
    def __init__(self, seed=0, dropout=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 2, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = F.adaptive_avg_pool2d(h, (1, 2)).flatten(1)  # keeps left/right apart
        return self.fc(self.drop(h))


FAST = dict(epochs=3, batch_size=16, lr=0.1, progress=False, weight_decay=0.0)


# --- kd_loss -------------------------------------------------------------------------------------

def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    t = torch.randn(4, 5)
    assert kd_loss(t.clone(), t).item() == 0.0
    assert kd_loss(t + torch.randn(4, 5), t).item() > 0


def test_kd_loss_matches_hand_computation_and_temperature():
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # softmax = (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: teacher softens to (sqrt3, 1)/(sqrt3 + 1); the loss is scaled by T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    soft = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    loss = kd_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(4 * soft, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher is not trained


def test_frozen_teacher_matches_the_teacher_and_leaves_it_alone():
    from dyninfer.train import FrozenTeacher

    torch.manual_seed(0)
    model = dy.models.create("lenet-5", num_classes=10, input_shape=(1, 16, 16))
    for m in model.modules():  # non-trivial BN statistics, so folding has work to do
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.train()
    x = torch.randn(5, 1, 16, 16)
    frozen = FrozenTeacher(model)
    frozen.train()  # stays in eval mode whatever the caller does
    assert not frozen.net.training and model.training
    with torch.no_grad():
        expected = model.eval()(x)
    got = frozen(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.net.modules())
    assert torch.allclose(got, expected, atol=1e-5) and not got.requires_grad
    no_stats = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False),
                                   torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 2))
    assert torch.allclose(FrozenTeacher(no_stats)(x), no_stats.eval()(x), atol=1e-5)  # BN kept, not folded
    resnet = dy.models.create("resnet-20", num_classes=10, input_shape=(3, 8, 8)).eval()
    z = torch.randn(2, 3, 8, 8)
    assert torch.allclose(FrozenTeacher(resnet)(z), resnet(z), atol=1e-6)  # not foldable: run as is


def test_kd_loss_is_a_batch_mean_and_rejects_bad_input():
    a, b = torch.randn(1, 3), torch.randn(1, 3)
    single = kd_loss(a, b)
    assert kd_loss(a.repeat(6, 1), b.repeat(6, 1)).item() == pytest.approx(single.item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        kd_loss(a, b, temperature=0)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 3\) and \(1, 4\)"):
        kd_loss(a, torch.randn(1, 4))


# --- evaluate ------------------------------------------------------------------------------------

class Lookup(nn.Module):
    """Returns a fixed row of logits per sample; the sample's index is its pixel value."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)
        self.modes = []

    def forward(self, x, scale=1.0):
        self.modes.append(self.training)
        index = torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()
        return self.table[index] * scale


def _ranked(true, rank, classes=7):
    """Logits where class ``true`` comes ``rank``-th (1 = top)."""
    order = [c for c in range(classes) if c != true]
    order.insert(rank - 1, true)
    row = torch.empty(classes)
    row[torch.tensor(order)] = torch.arange(classes, 0, -1, dtype=torch.float)
    return row


def test_evaluate_known_top1_top5_loss_and_mode():
    ranks = [1, 1, 1, 2, 3, 5, 5, 6, 7, 6]  # top1: 3/10, top5: 7/10
    labels = torch.tensor([i % 7 for i in range(10)])
    table = torch.stack([_ranked(int(y), r) for y, r in zip(labels, ranks)])
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    data = ImageSet(images, labels, num_classes=7)
    model = Lookup(table).train()
    result = evaluate(model, data, batch_size=3)
    assert result["top1"] == pytest.approx(0.3) and result["top5"] == pytest.approx(0.7) and result["n"] == 10
    assert result["loss"] == pytest.approx(F.cross_entropy(table, labels).item(), rel=1e-6)
    assert model.training and model.modes == [False] * 4  # evaluated in eval mode, mode restored
    halved = evaluate(model, data, forward=lambda m, x: m(x, scale=0.5))
    assert halved["loss"] == pytest.approx(F.cross_entropy(table * 0.5, labels).item(), rel=1e-6)


def test_evaluate_top5_with_fewer_classes_and_bad_logits():
    data = stripes(8)
    model = Net().eval()
    assert evaluate(model, data)["top5"] == 1.0  # k = min(5, 2)
    assert not model.training
    with pytest.raises(ValueError, match=r"logits of shape \(8, 2\).*got \(8, 3\)"):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data)


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"optimizer": "rmsprop"}, "optimizer must be 'sgd' or 'adam', got 'rmsprop'"),
    ({"schedule": "linear"}, "schedule must be 'cosine', 'step' or 'none', got 'linear'"),
    ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
    ({"lr": -1.0}, "lr must be a number > 0"),
    ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"step_milestones": (0.75, 0.5)}, "strictly increasing"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"momentum": 0.0}, "nesterov=True needs momentum > 0"),
    ({"progress": "no"}, "progress must be True or False"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_config_defaults_and_round_trip():
    assert TrainConfig().lr == 0.05 and TrainConfig(optimizer="adam").lr == 1e-3
    cfg = TrainConfig(step_milestones=[0.3, 0.6], epochs=7)
    assert cfg.step_milestones == (0.3, 0.6)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['epoch'\\]"):
        TrainConfig.from_dict({"epoch": 3})


def test_lr_schedules():
    cos = TrainConfig(epochs=4, schedule="cosine")
    assert [lr_factor(cos, e) for e in range(4)] == pytest.approx([1, 0.5 + 0.25 * math.sqrt(2), 0.5, 0.5 - 0.25 * math.sqrt(2)])
    step = TrainConfig(epochs=10, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [lr_factor(step, e) for e in range(10)] == pytest.approx([1] * 5 + [0.1] * 2 + [0.01] * 3)
    odd = TrainConfig(epochs=100, schedule="step", step_milestones=(0.29,))  # 0.29 * 100 is 28.999...
    assert lr_factor(odd, 28) == 1 and lr_factor(odd, 29) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(schedule="none"), 7) == 1


@pytest.mark.parametrize("schedule,factors", [
    ("step", [1, 1, 0.1, 0.01]),
    ("cosine", [1, 0.5 + 0.25 * math.sqrt(2), 0.5, 0.5 - 0.25 * math.sqrt(2)]),
])
def test_fit_applies_the_schedule(schedule, factors):
    cfg = TrainConfig(**{**FAST, "epochs": 4, "lr": 0.2, "schedule": schedule})
    seen = []

    class Spy:
        def on_epoch_end(self, state):
            seen.append(state.optimizer.param_groups[0]["lr"])

    history = fit(Net(), stripes(16), cfg, callbacks=[Spy()])
    assert [h["lr"] for h in history] == pytest.approx([0.2 * f for f in factors])
    assert seen == pytest.approx([0.2 * f for f in factors])


# --- fit -----------------------------------------------------------------------------------------

def test_fit_learns_and_writes_metrics_config_and_model(tmp_path):
    train, test = stripes(64, seed=0), stripes(32, seed=1)
    model = Net()
    before = evaluate(model, test)
    cfg = TrainConfig(**{**FAST, "epochs": 4})
    history = fit(model, train, cfg, test=test, out=tmp_path)
    assert len(history) == 4 and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["test_top1"] >= 0.9 > before["top1"]
    assert 0 <= history[-1]["train_acc"] <= 1 and history[-1]["images_per_s"] > 0

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    assert {"epoch", "train_loss", "train_acc", "test_top1", "test_top5", "lr", "seconds", "images_per_s"} <= set(history[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(config["train"]) == cfg and config["data"]["n"] == 64
    fresh = Net(seed=5)
    ckpt.load_model(tmp_path / "model", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "checkpoint.safetensors", "config.json", "metrics.jsonl", "model.json", "model.safetensors"]


def test_callbacks_are_called_and_see_the_state():
    calls = {"after_backward": 0, "batch_end": 0, "epoch_end": []}

    class Counter:
        def on_after_backward(self, state):
            assert all(p.grad is not None for p in state.model.parameters())
            calls["after_backward"] += 1

        def on_batch_end(self, state):
            calls["batch_end"] += 1
            assert state.step == calls["batch_end"] and state.loss.dim() == 0

        def on_epoch_end(self, state):
            calls["epoch_end"].append((state.epoch, state.step, state.metrics["epoch"]))

    fit(Net(), stripes(40), TrainConfig(**FAST), callbacks=[Counter()])  # 40 / 16 -> 3 steps per epoch
    assert calls["after_backward"] == calls["batch_end"] == 9
    assert calls["epoch_end"] == [(0, 3, 1), (1, 6, 2), (2, 9, 3)]


def test_on_after_backward_can_zero_gradients():
    class Freeze:
        def on_after_backward(self, state):
            for p in state.model.parameters():
                p.grad.zero_()

    for optimizer in ("sgd", "adam"):
        model = Net()
        before = [p.detach().clone() for p in model.parameters()]
        fit(model, stripes(32), TrainConfig(**{**FAST, "optimizer": optimizer}), callbacks=[Freeze()])
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), optimizer


def test_loss_fn_dict_parts_are_logged_and_bad_returns_are_clear():
    def two_parts(model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return {"loss": ce + 0.0 * logits.pow(2).mean(), "ce": ce, "logits": logits}

    history = fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 1}), loss_fn=two_parts)
    assert history[0]["train_ce"] == pytest.approx(history[0]["train_loss"], rel=1e-5)
    assert history[0]["train_acc"] is not None
    history = fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 1}),
                  loss_fn=lambda m, x, y: F.cross_entropy(m(x), y))
    assert history[0]["train_acc"] is None  # a bare loss carries no logits
    with pytest.raises(TypeError, match=r"dict with a 'loss' Tensor; got dict with keys \['ce'\]"):
        fit(Net(), stripes(32), TrainConfig(**FAST), loss_fn=lambda m, x, y: {"ce": m(x).sum()})


def test_same_seed_same_weights_and_caller_rng_untouched():
    cfg = TrainConfig(**FAST, augment=True)
    a, b, c = Net(dropout=0.3), Net(dropout=0.3), Net(dropout=0.3)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    data = stripes(32, augmentation="crop-flip")
    fit(a, data, cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    fit(b, data, cfg)
    fit(c, data, TrainConfig(**{**FAST, "seed": 1}))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


class Kill(Exception):
    pass


class KillAt:
    """Simulates a crash in the middle of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_batch_end(self, state):
        if state.epoch == self.epoch and state.batch_index == 1:
            raise Kill


class CountingCallback:
    """A callback with state that must survive a resume."""

    def __init__(self):
        self.total = torch.zeros(())

    def on_batch_end(self, state):
        self.total += state.loss

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, d):
        self.total = d["total"].clone()


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adam", "step")])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer, schedule):
    train, test = stripes(48, augmentation="crop-flip"), stripes(16, seed=2)
    cfg = TrainConfig(**{**FAST, "optimizer": optimizer, "schedule": schedule, "weight_decay": 5e-4})
    straight, counter = Net(dropout=0.2), CountingCallback()
    history = fit(straight, train, cfg, test=test, out=tmp_path / "straight", callbacks=[counter])

    crashed = Net(dropout=0.2)
    with pytest.raises(Kill):
        fit(crashed, train, cfg, test=test, out=tmp_path / "run", callbacks=[KillAt(2), CountingCallback()])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "run" / "model.safetensors").exists()

    resumed, counter2 = Net(seed=9, dropout=0.2), CountingCallback()  # a new process: other init
    history2 = fit(resumed, train, cfg, test=test, out=tmp_path / "run", callbacks=[counter2])
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(counter.total, counter2.total)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(history2) == strip(history)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_resume_refuses_a_changed_config_and_resume_false_starts_over(tmp_path):
    fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 1}), out=tmp_path)
    with pytest.raises(ValueError, match=r"config differs in lr \(checkpoint 0.1, now 0.2\)"):
        fit(Net(), stripes(32), TrainConfig(**{**FAST, "lr": 0.2}), out=tmp_path)
    history = fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 2}), out=tmp_path, resume=False)
    assert [h["epoch"] for h in history] == [1, 2]
    # a finished run resumed with more epochs continues where it stopped
    history = fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 3}), out=tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_resume_into_another_model_is_a_checkpoint_mismatch(tmp_path):
    fit(Net(), stripes(32), TrainConfig(**{**FAST, "epochs": 1}), out=tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ckpt.CheckpointMismatchError, match="missing in checkpoint: 1.bias, 1.weight"):
        fit(other, stripes(32), TrainConfig(**{**FAST, "epochs": 2}), out=tmp_path)


def test_divergence_is_reported_and_keeps_the_checkpoint(tmp_path):
    def nan_after_first_epoch(model, x, y):
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if stage["epoch"] >= 1 else loss

    stage = {"epoch": 0}

    class Track:
        def on_epoch_end(self, state):
            stage["epoch"] = state.epoch + 1

    with pytest.raises(FloatingPointError, match="diverged in epoch 2"):
        fit(Net(), stripes(32), TrainConfig(**FAST), out=tmp_path, loss_fn=nan_after_first_epoch, callbacks=[Track()])
    _, meta = ckpt.load(tmp_path / "checkpoint")
    assert meta["epochs_done"] == 1


def test_linear_warmup_ramps_the_learning_rate():
    class Record:
        def __init__(self):
            self.lrs = []

        def on_after_backward(self, state):
            self.lrs.append(state.optimizer.param_groups[0]["lr"])

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (48, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(48) % 2, 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    record = Record()
    fit(model, data, TrainConfig(epochs=2, batch_size=8, lr=0.1, schedule="none", warmup_steps=4, progress=False),
        callbacks=[record])
    assert record.lrs[:6] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert len(record.lrs) == 12 and all(lr == pytest.approx(0.1) for lr in record.lrs[4:])
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


# --- the step-budget mode ---------------------------------------------------------------------------

def _hand_loop(model, data, steps, batch_size, seed, lr):
    """The step mode written out with torch's own pieces: passes over data.batches from one seeded
    generator, SGD, LambdaLR's cosine. Independent of dyninfer's loop and BatchStream."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    g = torch.Generator().manual_seed(seed)

    def stream():
        while True:
            yield from data.batches(batch_size, shuffle=True, augment=True, generator=g, drop_last=True)

    batches = stream()
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model


def test_step_mode_equals_a_hand_written_loop_with_torch_schedulers():
    data = stripes(n=40, augmentation="crop-flip")  # 40 / 16: a pass drops 8 samples, 13 steps span 5 passes
    expected = _hand_loop(Net(), data, 13, 16, 5, 0.1)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    counted = []
    history = fit(model, data, TrainConfig(steps=13, batch_size=16, seed=5, progress=False, checkpoint_every=4),
                  optimizer=opt, callbacks=[type("C", (), {"on_batch_end": lambda self, s: counted.append(s.step)})()])
    assert counted == list(range(1, 14))
    assert [r["step"] for r in history] == [4, 8, 12, 13]
    for a, b in zip(expected.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_batch_stream_resumes_mid_pass_from_its_state():
    data = stripes(n=30, augmentation="crop-flip")
    straight = dy.data.BatchStream(data, 8, seed=3)
    reference = [next(straight) for _ in range(11)]
    first = dy.data.BatchStream(data, 8, seed=3)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    again = dy.data.BatchStream(data, 8, seed=99)
    again.load_state_dict(state)
    for x, y in reference[5:]:
        gx, gy = next(again)
        assert torch.equal(x, gx) and torch.equal(y, gy)


@pytest.mark.parametrize("crash_at", [5, 8])  # after the checkpoints at steps 3 and 6
def test_step_mode_resume_equals_uninterrupted_run(tmp_path, crash_at):
    data = stripes(n=40, augmentation="crop-flip")
    config = TrainConfig(steps=10, batch_size=16, lr=0.1, seed=2, checkpoint_every=3, progress=False)
    torch.manual_seed(11)
    straight = Net(dropout=0.5)
    torch.manual_seed(11)  # the step mode draws dropout from the caller's RNG
    fit(straight, data, config)

    class Crash:
        def on_batch_end(self, state):
            if state.step == crash_at:
                raise KeyboardInterrupt

    torch.manual_seed(11)
    model = Net(dropout=0.5)
    torch.manual_seed(11)
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, config, out=tmp_path / "run", callbacks=[Crash()])
    resumed = Net(seed=5, dropout=0.5)  # another process: weights, optimizer, stream and RNG come from the checkpoint
    torch.manual_seed(0)
    history = fit(resumed, data, config, out=tmp_path / "run")
    assert [r["step"] for r in history] == [3, 6, 9, 10]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_step_mode_stop_and_start_step_and_bad_options():
    data = stripes(n=40)

    class StopAt4:
        def on_batch_end(self, state):
            state.stop = state.step == 4

    history = fit(Net(), data, TrainConfig(steps=10, batch_size=8, progress=False), callbacks=[StopAt4()])
    assert history[-1]["step"] == 4
    steps = []
    fit(Net(), data, TrainConfig(steps=10, batch_size=8, progress=False), start_step=7,
        callbacks=[type("C", (), {"on_batch_start": lambda self, s: steps.append(s.step)})()])
    assert steps == [7, 8, 9]
    with pytest.raises(ValueError, match="step-budget mode"):
        fit(Net(), data, TrainConfig(epochs=1, progress=False), start_step=3)
    with pytest.raises(ValueError, match="start_step"):
        fit(Net(), data, TrainConfig(steps=5, progress=False), start_step=6)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)


def test_step_mode_a_stopped_run_stays_stopped_on_resume(tmp_path):
    data = stripes(n=40)

    class StopAt4:
        def on_batch_end(self, state):
            state.stop = state.stop or state.step == 4

    config = TrainConfig(steps=20, batch_size=8, checkpoint_every=10, progress=False)
    fit(Net(), data, config, out=tmp_path / "run", callbacks=[StopAt4()])
    steps = []
    history = fit(Net(), data, config, out=tmp_path / "run",
                  callbacks=[type("C", (), {"on_batch_start": lambda self, s: steps.append(s.step)})()])
    assert steps == [] and [r["step"] for r in history] == [4]
    with pytest.raises(ValueError, match="state_dict"):  # a stream the checkpoint cannot hold
        fit(Net(), data, config, out=tmp_path / "other", batches=iter(dy.data.BatchStream(data, 8, 0).__next__, None))
