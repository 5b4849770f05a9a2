"""The `dyninfer` command as a user runs it: outputs, run directories, one-line errors."""

import json

import pytest
import torch

from dyninfer.cli import main
from dyninfer.methods.stepping import SteppingNet


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_layers_and_total_macs(capsys):
    code, out, _ = run(capsys, "info", "lenet-5", "--input-shape", "1,28,28")
    assert code == 0
    assert "693,000 MACs" in out and "| layer |" in out


@pytest.mark.parametrize("argv, message", [
    (["info", "no-such-net"], "unknown model 'no-such-net'"),
    (["train", "--model", "lenet-5", "--data", "imagenet-99", "--out", "x"], "imagenet-99"),
])
def test_bad_values_give_one_line_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_flags_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["construct", "--model", "lenet-5", "--budgets", "0.1,abc", "--out", "x"])
    assert exc.value.code == 2
    assert "budgets must be comma-separated numbers" in capsys.readouterr().err


def test_bad_budgets_reach_the_user_as_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "construct", "--model", "lenet-5", "--budgets", "0.5,0.3",
                       "--out", str(tmp_path / "s"), "--quiet")
    assert code == 2 and "strictly increasing" in err


def test_eval_of_a_non_run_directory(capsys, tmp_path):
    code, _, err = run(capsys, "eval", str(tmp_path))
    assert code == 2 and "not a dyninfer run directory" in err


def test_train_construct_eval_round_trip(capsys, tmp_path):
    teacher = tmp_path / "orig"
    code, out, _ = run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--epochs", "2",
                       "--batch-size", "64", "--out", str(teacher), "--quiet")
    assert code == 0 and "test top-1" in out
    meta = json.loads((teacher / "run.json").read_text())
    assert meta["kind"] == "train" and 0 < meta["test"]["top1"] <= 1

    step = tmp_path / "step"
    code, out, _ = run(capsys, "construct", "--model", "lenet-5", "--data", "digits", "--budgets", "0.3,0.6,0.9",
                       "--teacher", str(teacher), "--iterations", "4", "--batches-per-iteration", "2",
                       "--batch-size", "64", "--retrain-epochs", "1", "--out", str(step), "--quiet")
    assert code == 0 and "subnet 3" in out
    table = json.loads((step / "table.json").read_text())
    assert all(f <= b for f, b in zip(table["mac_fraction"], [0.3, 0.6, 0.9]))
    assert table["original_accuracy"] == pytest.approx(meta["test"]["top1"])

    code, out2, _ = run(capsys, "eval", str(step))
    assert code == 0 and out2.strip() == out.strip()  # the saved net evaluates to the same table
    net = SteppingNet.load(step / "stepping")  # save/load keeps tags, masks and weights
    x = torch.randn(4, 1, 8, 8)
    assert net.num_subnets == 3
    again = SteppingNet.load(step / "stepping")
    torch.testing.assert_close(net(x, subnet=2), again(x, subnet=2))
    assert json.loads((step / "table.json").read_text())["accuracy"] == table["accuracy"]

    # construction was checkpointed: a rerun resumes it (same table), a changed one is refused
    args = ["construct", "--model", "lenet-5", "--data", "digits", "--budgets", "0.3,0.6,0.9", "--teacher",
            str(teacher), "--iterations", "4", "--batches-per-iteration", "2", "--batch-size", "64",
            "--retrain-epochs", "1", "--out", str(step), "--quiet"]
    code, out3, _ = run(capsys, *args)
    assert code == 0 and out3.strip() == out.strip()
    code, _, err = run(capsys, *args[:-3], "--lr", "0.5", *args[-3:])
    assert code == 2 and "cannot resume" in err and "lr (checkpoint 0.01, now 0.5)" in err and "--no-resume" in err
    assert run(capsys, *args[:-3], "--lr", "0.5", "--no-resume", *args[-3:])[0] == 0


def test_construct_refuses_a_teacher_of_another_model(capsys, tmp_path):
    teacher = tmp_path / "orig"
    assert run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--epochs", "1",
               "--out", str(teacher), "--quiet")[0] == 0
    code, _, err = run(capsys, "construct", "--model", "lenet-3c1l", "--data", "digits", "--budgets", "0.5",
                       "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--quiet")
    assert code == 2 and "teacher" in err and "lenet-5 on digits" in err


def test_demo_runs_end_to_end_small(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--teacher-epochs", "1",
                       "--iterations", "3", "--retrain-epochs", "1", "--quiet")
    assert code == 0
    assert "original network" in out and "subnet 4" in out and "incremental check" in out
    table = json.loads((tmp_path / "demo" / "table.json").read_text())
    assert len(table["accuracy"]) == 4 and all(0 <= a <= 1 for a in table["accuracy"])
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "demo.png" in out


def test_a_second_run_on_the_same_out_is_refused_with_the_holders_pid(capsys, tmp_path):
    import os
    import subprocess
    import sys

    from dyninfer import runs

    out = tmp_path / "busy"
    out.mkdir()
    with runs.lock(out, "train"):  # a run holding the folder (here: this process)
        code, _, err = run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--epochs", "1",
                           "--out", str(out))
        assert code == 2 and f"in use by another dyninfer run (pid {os.getpid()})" in err
    assert not (out / "run.json").exists()
    # a run killed while holding it: the kernel released its lock, the file it left is taken over
    subprocess.run([sys.executable, "-c", "import os, sys; from dyninfer import runs\n"
                    f"with runs.lock({str(out)!r}, 'train'): os._exit(9)"], check=False)
    assert (out / ".dyninfer.lock").exists()
    code, _, err = run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--epochs", "1", "--out", str(out))
    assert code == 0, err
    assert (out / "run.json").exists()


def test_a_refused_run_leaves_no_folder_and_a_bad_out_is_named(capsys, tmp_path):
    out = tmp_path / "new"
    code, _, err = run(capsys, "train", "--model", "lenet-5", "--data", "imagenet-99", "--out", str(out))
    assert code == 2 and not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--out", str(blocker / "sub"))
    assert code == 2 and str(blocker / "sub") in err and "Traceback" not in err


def test_a_library_warning_reaches_the_user_as_one_line(capsys, monkeypatch):
    import warnings

    from dyninfer.cli import train as train_commands

    def warns(args):
        warnings.warn("construction reached N_t=4 iterations before every budget was met", stacklevel=2)
        return 0

    monkeypatch.setattr(train_commands, "cmd_info", warns)
    code, _, err = run(capsys, "info", "lenet-5")
    assert code == 0
    assert err == "dyninfer info: notice: construction reached N_t=4 iterations before every budget was met\n"


def test_data_names_are_normalised_once(capsys, tmp_path):
    teacher = tmp_path / "orig"
    assert run(capsys, "train", "--model", "lenet-5", "--data", "digits", "--epochs", "1", "--out", str(teacher),
               "--quiet")[0] == 0
    code, _, err = run(capsys, "construct", "--model", "lenet-5", "--data", "DIGITS", "--budgets", "0.5,0.9",
                       "--teacher", str(teacher), "--iterations", "2", "--batches-per-iteration", "1",
                       "--batch-size", "64", "--retrain-epochs", "0", "--out", str(tmp_path / "s"), "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "run.json").read_text())["data"] == "digits"


def test_a_run_that_fails_inside_its_command_leaves_no_new_folder(capsys, tmp_path):
    out = tmp_path / "s"
    code, _, err = run(capsys, "construct", "--model", "lenet-5", "--budgets", "0.5,0.3", "--out", str(out), "--quiet")
    assert code == 2 and "strictly increasing" in err and not out.exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo"
    assert main(["demo", "--out", str(out), "--teacher-epochs", "1", "--iterations", "3", "--retrain-epochs", "1",
                 "--quiet"]) == 0
    return out


@pytest.mark.parametrize("fmt", ["pt", "torchscript", "onnx"])
def test_export_writes_a_file_that_runs_without_dyninfer(fmt, demo_run, capsys, tmp_path):
    import subprocess
    import sys

    if fmt == "onnx":
        from test_runtime import _onnx_modules

        _onnx_modules()
    target = tmp_path / f"sub2.{fmt}"
    code, out, err = run(capsys, "export", str(demo_run), "--subnet", "2", "--format", fmt, "--out", str(target))
    assert code == 0, err
    assert f"subnet 2 of 4" in out and "differ from the library's by at most" in out
    loader = {"pt": "m = torch.load(p, weights_only=False); y = m(x)",
              "torchscript": "m = torch.jit.load(p); y = m(x)",
              "onnx": "import onnxruntime as o; y = o.InferenceSession(p).run(None, {'input': x.numpy()})[0]"}[fmt]
    script = (f"import sys; sys.modules['dyninfer'] = None\nimport torch\np = {str(target)!r}\n"
              f"x = torch.zeros(3, 1, 8, 8)\n{loader}\nprint(tuple(y.shape))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 10)"


@pytest.mark.parametrize("extra, message", [
    (["--subnet", "9"], "--subnet must be in 1..4"),
    (["--out", "/no/such/folder/x.pt"], "folder /no/such/folder does not exist"),
])
def test_export_refuses_bad_requests_in_one_line(extra, message, demo_run, capsys, tmp_path):
    code, _, err = run(capsys, "export", str(demo_run), "--out", str(tmp_path / "x.pt"), *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made
    with pytest.raises(SystemExit):
        main(["export", str(demo_run), "--out", str(tmp_path / "x.pt"), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [0, 100])
def test_finished_progress_bars_leave_no_blank_lines(tmp_path, columns):
    """A user's terminal (a pseudo-terminal: sized, or without a size as under `script`) shows
    each bar while it runs; when it finishes it is gone and no empty line is left behind."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40 if columns else 0, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dyninfer", "construct", "--model", "lenet-5", "--data", "digits", "--budgets",
         "0.4,0.9", "--iterations", "3", "--batches-per-iteration", "2", "--retrain-epochs", "1",
         "--out", str(tmp_path / "run")], stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    if columns:
        assert "construct:" in raw and "retrain:" in raw, "no bar was shown: the check below would prove nothing"
    # what stays on screen of each line is the text after its last carriage return
    shown = [line.rsplit("\r", 1)[-1].strip() for line in raw.replace("\r\n", "\n").split("\n")[:-1]]
    assert shown and all(shown), f"blank line(s) left at {[i for i, s in enumerate(shown) if not s]}: {shown}"
    assert any(s.startswith("retrained all subnets for 1 epochs") for s in shown)
