"""dyninfer.data: loaders for every file format, lookup order, downloads, splits, augmentation.

Every file here is tiny and generated into tmp_path; downloads come from file:// URLs or a
127.0.0.1 server, and any other URL fails the test: nothing touches the internet.
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import http.server
import os
import pickle
import struct
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dyninfer import data
from dyninfer.data import ImageSet

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REAL_SYSTEM_DIRS = data.system_dirs


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No environment, cache or system folder leaks in, and no URL but local ones is opened."""
    monkeypatch.delenv("DYNINFER_DATA", raising=False)
    monkeypatch.delenv("DYNINFER_DATA_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "system_dirs", lambda: [])
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        text = url if isinstance(url, str) else url.full_url
        assert text.startswith(("file://", "http://127.0.0.1:")), f"test tried to open {text}"
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


# ---------------------------------------------------------------- helpers writing tiny files


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y_tr = np.arange(n_train, dtype=np.uint8) % 10
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_te = (np.arange(n_test, dtype=np.uint8) * 3) % 10
    for name, arr in (("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                      ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)):
        write_idx(folder / name, arr, gz)
    return x_tr, y_tr, x_te, y_te


def write_cifar_pickle(path: Path, images_nchw: np.ndarray, labels, label_key: str,
                       protocol: int = 2) -> None:
    """The layout of the official archive: bytes keys, rows of 3072 bytes (R, G, B planes)."""
    obj = {b"batch_label": b"test", b"data": images_nchw.reshape(len(images_nchw), -1),
           label_key.encode(): list(map(int, labels))}
    if label_key == "fine_labels":
        obj[b"coarse_labels"] = [int(v) // 5 for v in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10_dir(folder: Path, per_batch: int = 2, n_test: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = (np.arange(per_batch) + i) % 10
        write_cifar_pickle(batches / f"data_batch_{i}", x, y, "labels")
        xs.append(x), ys.append(y)
    x_te = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    y_te = np.arange(n_test) % 10
    write_cifar_pickle(batches / "test_batch", x_te, y_te, "labels")
    return np.concatenate(xs), np.concatenate(ys), x_te, y_te


def digest(path: Path, algo: str) -> str:
    return f"{algo}:{hashlib.new(algo, path.read_bytes()).hexdigest()}"


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL): a throwaway HTTP server on 127.0.0.1 serving that folder."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------- real, bundled data


def test_digits_loads_for_real_with_a_stratified_partition():
    from sklearn.datasets import load_digits

    train, test = data.load("digits")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert train.input_shape == test.input_shape == (1, 8, 8)
    assert train.num_classes == test.num_classes == 10 and train.name == "digits"
    assert (len(train), len(test)) == (1438, 359)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0

    # train + test is exactly the original set (as a multiset of image/label pairs)
    bunch = load_digits()
    full = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    key = lambda img, y: (img.tobytes(), int(y))  # noqa: E731
    original = collections.Counter(key(i, y) for i, y in zip(full, bunch.target))
    got = collections.Counter(key(i[0].numpy(), y) for s in (train, test)
                              for i, y in zip(s.images, s.labels))
    assert got == original

    counts = np.bincount(bunch.target, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)

    again, _ = data.load("DIGITS")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.setattr(data, "system_dirs", lambda: [Path("/usr/share/datasets")])
    train, test = data.load("fashion_mnist", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.input_shape == (1, 28, 28) and train.images.dtype == torch.uint8
    assert train.name == "fashion-mnist" and train.augmentation == "none"
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))


# ---------------------------------------------------------------- file formats


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_gzipped_or_raw(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = write_mnist(tmp_path / "m", gz=gz)
    train, test = data.load("MNIST", root=tmp_path / "m", download=False)
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(x_tr))
    assert torch.equal(test.images[:, 0], torch.from_numpy(x_te))
    assert train.labels.tolist() == y_tr.tolist() and test.labels.tolist() == y_te.tolist()
    assert train.labels.dtype == torch.int64 and train.mean == (0.1307,)


def test_idx_in_torchvision_layout_and_fashion_alias(tmp_path):
    x_tr, *_ = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    train, _ = data.load("fmnist", root=tmp_path, download=False)
    assert train.name == "fashion-mnist" and torch.equal(train.images[:, 0], torch.from_numpy(x_tr))


def test_corrupt_idx_names_the_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])  # truncated
    with pytest.raises(data.DataFormatError, match="train-images-idx3-ubyte.*truncated"):
        data.load("mnist", root=tmp_path, download=False)
    bad.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))  # float elements, not bytes
    with pytest.raises(data.DataFormatError, match="unsigned bytes"):
        data.load("mnist", root=tmp_path, download=False)


def test_cifar10_pickle_directory(tmp_path):
    x_tr, y_tr, x_te, y_te = write_cifar10_dir(tmp_path)
    train, test = data.load("CIFAR10", root=tmp_path, download=False)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(x_tr))  # batches 1..5 in order
    assert torch.equal(test.images, torch.from_numpy(x_te))
    assert train.labels.tolist() == y_tr.tolist() and test.labels.tolist() == y_te.tolist()
    assert train.augmentation == "crop-flip" and len(train.mean) == 3


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    x_tr = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    x_te = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    folder = tmp_path / "cifar-100-python"
    write_cifar_pickle(folder / "train", x_tr, [99, 7, 42, 0], "fine_labels", protocol=4)
    write_cifar_pickle(folder / "test", x_te, [13, 98], "fine_labels", protocol=5)
    train, test = data.load("cifar-100", root=tmp_path, download=False)
    assert train.num_classes == 100 and train.labels.tolist() == [99, 7, 42, 0]
    assert test.labels.tolist() == [13, 98] and torch.equal(test.images, torch.from_numpy(x_te))


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar10_dir(tmp_path)
    pwned = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit(pwned)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil))
    with pytest.raises(data.DataFormatError, match="posix.mkdir|os.mkdir|not allowed"):
        data.load("cifar10", root=tmp_path, download=False)
    assert not pwned.exists()


def test_npz_nhwc_is_transposed_to_nchw(tmp_path):
    rng = np.random.default_rng(2)
    x_tr = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x_tr[3, 1, 2] = (10, 20, 30)  # pixel at row 1, column 2 of image 3: R, G, B
    np.savez(tmp_path / "cifar10.npz", x_train=x_tr, y_train=np.array([0, 1, 2, 3, 9], np.uint8),
             x_test=x_te, y_test=np.array([5, 6], np.uint8), classes=np.array(["a", "b"]))
    train, test = data.load("cifar10", root=tmp_path, download=False)
    assert train.images.shape == (5, 3, 32, 32) and train.images.is_contiguous()
    assert train.images[3, :, 1, 2].tolist() == [10, 20, 30]
    assert torch.equal(train.images, torch.from_numpy(x_tr).permute(0, 3, 1, 2))
    assert train.labels.tolist() == [0, 1, 2, 3, 9] and test.labels.tolist() == [5, 6]


def test_npz_with_wrong_shape_or_labels_is_a_clear_error(tmp_path):
    x = np.zeros((2, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=[0, 1], x_test=x, y_test=[0, 1])
    with pytest.raises(data.DataFormatError, match=r"\(N, 32, 32, 3\)"):
        data.load("cifar10", root=tmp_path, download=False)
    x = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=[0, 10], x_test=x, y_test=[0, 1])
    with pytest.raises(data.DataFormatError, match="labels must be in 0..9"):
        data.load("cifar10", root=tmp_path, download=False)


def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(3)
    x_tr = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # SVHN layout: H, W, C, N
    x_te = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    x_tr[5, 7, :, 2] = (1, 2, 3)
    y_tr = np.array([[10], [1], [9], [10]], np.uint8)  # (N, 1), 10 stands for digit 0
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x_tr, "y": y_tr})
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x_te, "y": np.array([[3], [10]], np.uint8)})
    train, test = data.load("SVHN", root=tmp_path, download=False)
    assert train.images.shape == (4, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert train.images[2, :, 5, 7].tolist() == [1, 2, 3]
    assert torch.equal(train.images, torch.from_numpy(x_tr).permute(3, 2, 0, 1))
    assert train.labels.tolist() == [0, 1, 9, 0] and test.labels.tolist() == [3, 0]
    assert train.augmentation == "none"


def test_svhn_without_scipy_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "train_32x32.mat").write_bytes(b"x")
    (tmp_path / "test_32x32.mat").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        data.load("svhn", root=tmp_path, download=False)


# ---------------------------------------------------------------- lookup order


def test_lookup_order_root_then_env_then_system(tmp_path, monkeypatch):
    write_mnist(tmp_path / "root", n_train=3)
    write_mnist(tmp_path / "env" / "mnist", n_train=4)  # <DYNINFER_DATA>/<name>
    write_mnist(tmp_path / "system" / "mnist", n_train=5)
    write_mnist(tmp_path / "xdg-cache" / "dyninfer" / "mnist", n_train=7)
    monkeypatch.setattr(data, "system_dirs", lambda: [tmp_path / "system"])
    monkeypatch.setenv("DYNINFER_DATA", str(tmp_path / "env"))

    assert len(data.load("mnist", root=tmp_path / "root", download=False)[0]) == 3
    assert len(data.load("mnist", download=False)[0]) == 4
    monkeypatch.delenv("DYNINFER_DATA")
    assert len(data.load("mnist", download=False)[0]) == 5
    monkeypatch.setattr(data, "system_dirs", lambda: [])
    assert len(data.load("mnist", download=False)[0]) == 7
    origins = [origin for _, origin in data.search_dirs("mnist", root=tmp_path / "root")]
    assert origins == ["root argument", "root argument", "user cache"]


def test_default_system_dirs_include_shared_data_next_to_the_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    dirs = REAL_SYSTEM_DIRS()
    assert Path("/usr/share/datasets") in dirs
    assert Path.cwd().parent / "shared" / "data" in dirs
    repo = Path(data.__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        assert repo.parent / "shared" / "data" in dirs


def test_missing_data_error_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "system_dirs", lambda: [tmp_path / "sys1", tmp_path / "sys2"])
    monkeypatch.setenv("DYNINFER_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist", root=tmp_path / "r", download=False)
    message = str(info.value)
    tried = data.search_dirs("fashion-mnist", root=tmp_path / "r")
    assert len(tried) == 9
    for folder, _ in tried:
        assert str(folder) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "DYNINFER_DATA" in message and "download=False" in message
    assert "fashion-mnist.s3-website" in message
    assert isinstance(info.value, data.DataNotFoundError)


# ---------------------------------------------------------------- downloads


def test_download_from_file_url_into_cache_with_checksum(tmp_path, monkeypatch):
    served = tmp_path / "mirror" / "mnist"  # $DYNINFER_DATA_URL/<name>/<file>
    x_tr, *_ = write_mnist(served, gz=True)
    files = {f.name: digest(f, "sha256") for f in sorted(served.iterdir())}
    monkeypatch.setitem(data.SOURCES, "mnist", data.Source("https://example.invalid/", files))
    monkeypatch.setenv("DYNINFER_DATA_URL", (tmp_path / "mirror").as_uri())

    train, _ = data.load("mnist")
    assert torch.equal(train.images[:, 0], torch.from_numpy(x_tr))
    cache = tmp_path / "xdg-cache" / "dyninfer" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)  # no temp files left

    for f in served.iterdir():  # second load reads the cache, not the mirror
        f.unlink()
    assert len(data.load("mnist")[0]) == 6


def test_download_archive_over_http_into_root(tmp_path, monkeypatch, http_dir):
    folder, url = http_dir
    x_tr, *_ = write_cifar10_dir(tmp_path / "src")
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    checksum = digest(folder / "cifar-10-python.tar.gz", "md5")
    monkeypatch.setitem(data.SOURCES, "cifar10", data.Source(
        "https://example.invalid/", {"cifar-10-python.tar.gz": checksum}, archive=True))

    train, _ = data.load("cifar10", root=tmp_path / "store", mirror=url)
    assert torch.equal(train.images, torch.from_numpy(x_tr))
    stored = sorted(p.name for p in (tmp_path / "store" / "cifar10").iterdir())
    assert stored == ["cifar-10-batches-py"]  # archive extracted, then removed


def test_wrong_checksum_raises_and_leaves_no_file(tmp_path, monkeypatch):
    served = tmp_path / "mirror"
    write_mnist(served, gz=True)
    files = {f.name: "sha256:" + "0" * 64 for f in served.iterdir()}
    monkeypatch.setitem(data.SOURCES, "mnist", data.Source("https://example.invalid/", files))
    with pytest.raises(data.ChecksumError, match="expected sha256:0000"):
        data.load("mnist", mirror=served.as_uri())
    cache = tmp_path / "xdg-cache" / "dyninfer" / "mnist"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_failed_download_is_reported_with_the_places_tried(tmp_path):
    missing_mirror = (tmp_path / "nowhere").as_uri()
    with pytest.raises(data.DataNotFoundError) as info:
        data.load("svhn", mirror=missing_mirror)
    message = str(info.value)
    assert "Downloading into" in message and "failed" in message
    assert f"{missing_mirror}/train_32x32.mat" in message
    assert str(tmp_path / "xdg-cache" / "dyninfer" / "svhn") in message


def test_a_failed_lookup_at_a_bad_root_leaves_no_folders(tmp_path):
    root = tmp_path / "typo" / "data"
    with pytest.raises(data.DataNotFoundError):
        data.load("svhn", root=root, mirror=(tmp_path / "nowhere").as_uri())
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- bad inputs


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, cifar10, cifar100, svhn"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="unknown data set"):
        data.search_dirs("cifar-1000")


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.2, 1.5, "0.1", True])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(data.synthetic(num=40), val_fraction=bad)


def test_imageset_rejects_bad_images_and_labels():
    ok = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        ImageSet(ok.float(), torch.zeros(4), 10)
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8\)"):
        ImageSet(ok[:, 0], torch.zeros(4), 10)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        ImageSet(ok, torch.zeros(3, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        ImageSet(ok, torch.tensor([0, 1, 2, 10]), 10)
    with pytest.raises(ValueError, match="labels must be integers"):
        ImageSet(ok, torch.zeros(4, dtype=torch.float32), 10)
    with pytest.raises(ValueError, match="mean/std need 1 entries"):
        ImageSet(ok, torch.zeros(4, dtype=torch.long), 10, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="augmentation"):
        ImageSet(ok, torch.zeros(4, dtype=torch.long), 10, augmentation="mixup")
    assert len(ImageSet(ok.numpy(), np.zeros(4, np.int64), 10)) == 4  # numpy arrays accepted


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (0.0, 2), [0, 2], (0, 1, 2)])
def test_batches_rejects_bad_shard(shard):
    with pytest.raises(ValueError, match="shard"):
        next(data.synthetic(num=8).batches(4, shard=shard))


def test_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        next(data.synthetic(num=8).batches(0))


# ---------------------------------------------------------------- crop_flip and batches


def _check_windows(images: torch.Tensor, out: torch.Tensor, padding: int) -> list[bool]:
    """Assert each output is a window of the padded input (maybe mirrored); return the flips."""
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    h, w = images.shape[2:]
    flips = []
    for img, res in zip(padded, out):
        windows = {(dy, dx, f) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   for f in (False, True)
                   if torch.equal(res, (lambda win: win.flip(2) if f else win)(
                       img[:, dy:dy + h, dx:dx + w]))}
        assert windows, "output is not a shifted/flipped window of the padded input"
        flips.append(any(f for *_, f in windows))
    return flips


def test_crop_flip_returns_shifted_flipped_windows():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 10, 12), dtype=torch.uint8, generator=g)
    out = data.crop_flip(images, padding=3, generator=g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips = _check_windows(images, out, 3)
    assert any(flips) and not all(flips)
    assert not torch.equal(out, images)


def test_crop_flip_without_padding_is_identity_or_mirror():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 2, 5, 7), dtype=torch.uint8, generator=g)
    out = data.crop_flip(images, padding=0, generator=g)
    same = [torch.equal(o, i) for o, i in zip(out, images)]
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       padding=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_crop_flip_property(n, c, h, w, padding, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    _check_windows(images, data.crop_flip(images, padding=padding, generator=g), padding)


def _indexed_set(n: int, num_classes: int) -> ImageSet:
    """Image i stores i in its first two pixels, so any subset reveals its indices."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ImageSet(images, torch.arange(n) % num_classes, num_classes)


def _indices(s: ImageSet) -> list[int]:
    return (s.images[:, 0, 0, 0].long() + 256 * s.images[:, 0, 0, 1].long()).tolist()


def test_shards_are_disjoint_equal_and_cover_the_set():
    labels_of = lambda s, rank, world: torch.cat([y for _, y in s.batches(  # noqa: E731
        5, shuffle=True, generator=torch.Generator().manual_seed(7), shard=(rank, world))])
    s = ImageSet(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), torch.arange(12), 12)
    shards = [labels_of(s, r, 3).tolist() for r in range(3)]
    assert [len(x) for x in shards] == [4, 4, 4]
    assert sorted(sum(shards, [])) == list(range(12))  # a partition
    assert shards[0] != list(range(0, 12, 3))  # shuffled

    s = ImageSet(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10), 10)
    shards = [labels_of(s, r, 4).tolist() for r in range(4)]
    assert [len(x) for x in shards] == [3, 3, 3, 3]  # padded like DistributedSampler
    assert set(sum(shards, [])) == set(range(10))

    tiny = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.arange(2), 2)
    assert [len(labels_of(tiny, r, 5)) for r in range(5)] == [1] * 5  # world > n


def test_batches_normalise_in_order_and_drop_last():
    s = data.synthetic(num=10, shape=(3, 4, 4), num_classes=2)
    batches = list(s.batches(4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert [len(y) for _, y in s.batches(4, drop_last=True)] == [4, 4]
    x = torch.cat([b for b, _ in batches])
    assert x.dtype == torch.float32 and x.shape == (10, 3, 4, 4)
    mean = torch.tensor(s.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(s.std, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (s.images.double() / 255 - mean) / std
    assert torch.allclose(x.double(), expected, atol=1e-5)
    floats = s.images.float() / 255
    before = floats.clone()
    assert torch.allclose(s.normalize(floats), x, atol=1e-5)
    assert torch.equal(floats, before)  # the input is not modified


def test_augment_only_applies_to_crop_flip_sets():
    s = data.synthetic(num=8, shape=(1, 6, 6))
    plain = torch.cat([x for x, _ in s.batches(8)])
    aug = torch.cat([x for x, _ in s.batches(8, augment=True, generator=torch.Generator())])
    assert torch.equal(plain, aug)
    s.augmentation = "crop-flip"
    aug = torch.cat([x for x, _ in s.batches(8, augment=True,
                                             generator=torch.Generator().manual_seed(0))])
    assert not torch.equal(plain, aug)


def test_repr_is_a_short_summary():
    text = repr(data.synthetic(num=300, shape=(3, 8, 8), num_classes=4))
    assert text == ("ImageSet(name='synthetic', n=300, shape=(3, 8, 8), num_classes=4, "
                    "augmentation='none')")


# ---------------------------------------------------------------- split and synthetic


def test_split_is_deterministic_disjoint_and_stratified():
    s = _indexed_set(203, num_classes=7)  # class sizes 29 each
    s.labels[:40] = 0  # make the classes unequal
    train, val = data.split(s, val_fraction=0.25, seed=3)
    tr, va = _indices(train), _indices(val)
    assert set(tr).isdisjoint(va) and sorted(tr + va) == list(range(203))
    assert len(va) == round(0.25 * 203)
    counts = torch.bincount(s.labels, minlength=7).double()
    val_counts = torch.bincount(val.labels, minlength=7).double()
    assert torch.all((val_counts - 0.25 * counts).abs() <= 1)
    assert tr == sorted(tr) and va == sorted(va)  # original order kept

    again = data.split(s, val_fraction=0.25, seed=3)
    assert _indices(again[1]) == va
    assert _indices(data.split(s, val_fraction=0.25, seed=4)[1]) != va


def test_split_keeps_a_training_sample_of_every_class():
    s = _indexed_set(6, num_classes=3)  # 2 per class
    train, val = data.split(s, val_fraction=0.9)
    assert sorted(train.labels.tolist()) == [0, 1, 2] and len(val) == 3
    with pytest.raises(ValueError, match="empty validation"):
        data.split(_indexed_set(3, num_classes=3), val_fraction=0.1)


def test_synthetic_is_deterministic_balanced_and_learnable():
    s = data.synthetic(num=200, shape=(1, 8, 8), num_classes=5, seed=1)
    assert s.images.dtype == torch.uint8 and s.images.shape == (200, 1, 8, 8)
    assert torch.bincount(s.labels).tolist() == [40] * 5
    assert torch.equal(data.synthetic(num=200, num_classes=5, seed=1).images, s.images)
    assert not torch.equal(data.synthetic(num=200, num_classes=5, seed=2).images, s.images)
    train, val = data.split(s, 0.5)
    x_tr, x_va = train.images.flatten(1).float(), val.images.flatten(1).float()
    centroids = torch.stack([x_tr[train.labels == c].mean(0) for c in range(5)])
    predicted = torch.cdist(x_va, centroids).argmin(1)
    assert (predicted == val.labels).float().mean() > 0.9
    with pytest.raises(ValueError, match="shape"):
        data.synthetic(shape=(8, 8))
