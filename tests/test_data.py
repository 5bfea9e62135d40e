"""Data sets and the batch loader: every format from small files written in the real layout,
user mistakes (missing/damaged files, bad names, bad checksums, malicious pickles), splits, and
the determinism and augmentation of :class:`BatchLoader`."""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust import data
from qrobust.data import (
    BatchLoader,
    DatasetInfo,
    ImageData,
    dataset_info,
    dataset_names,
    load_dataset,
    split_indices,
)
from qrobust.datasets import files
from qrobust.errors import ConfigError, DataError, QrobustError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test sees the user's QROBUST_DATA or ./data."""
    monkeypatch.delenv(files.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- writers for the real formats
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes((0, 0, 8, array.ndim)) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_idx_set(
    folder: Path, gz: bool = True, n_train: int = 20, n_test: int = 10
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"batch",
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img.png"] * n,
    }


def pickle_py2_style(obj: object) -> bytes:
    """Protocol 2 naming numpy.core.multiarray, as the official (Python 2) CIFAR files do."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(root: Path, name: str, as_tar: bool = False, protocol: int | None = None) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, key, k = root / "cifar-10-batches-py", b"labels", 10
        batches = {f"data_batch_{i}": cifar_batch(rng, 4, key, k) for i in range(1, 6)}
        batches["test_batch"] = cifar_batch(rng, 3, key, k)
        batches["batches.meta"] = {b"label_names": [b"airplane"] * 10}
    else:
        folder, key, k = root / "cifar-100-python", b"fine_labels", 100
        batches = {"train": cifar_batch(rng, 6, key, k), "test": cifar_batch(rng, 3, key, k)}
        for b in batches.values():
            b[b"coarse_labels"] = [0] * len(b[key])
        batches["meta"] = {b"fine_label_names": [b"apple"] * 100}
    folder.mkdir(parents=True)
    for member, obj in batches.items():
        raw = pickle_py2_style(obj) if protocol is None else pickle.dumps(obj, protocol=protocol)
        (folder / member).write_bytes(raw)
    if as_tar:
        archive = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return batches


def write_svhn(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    xs = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    ys = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    ys[0] = 10  # the digit 0
    savemat(path, {"X": xs, "y": ys})
    return xs, ys


GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def sign_color(c: int, i: int) -> tuple[int, int, int]:
    return (5 * c, 40 + 20 * i, 200)


def write_sign(path: Path, c: int, i: int, w: int = 41, h: int = 37) -> str:
    """A (w x h) .ppm: the ROI [6, 5, w-5, h-6) in one colour, the margin black; its CSV row."""
    from PIL import Image

    img = np.zeros((h, w, 3), dtype=np.uint8)
    roi = (6, 5, w - 5, h - 6)
    img[roi[1] : roi[3], roi[0] : roi[2]] = sign_color(c, i)
    Image.fromarray(img).save(path)
    return f"{path.name};{w};{h};{';'.join(map(str, roi))};{c}\n"


def write_gtsrb(root: Path, classes: tuple[int, ...] = (0, 14, 42)) -> None:
    train = root / "GTSRB" / "Final_Training" / "Images"
    for c in classes:
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        rows = [write_sign(d / f"00000_{i:05d}.ppm", c, i) for i in range(2)]
        (d / f"GT-{c:05d}.csv").write_text(GTSRB_HEADER + "".join(rows))
    test = root / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = [write_sign(test / f"{i:05d}.ppm", c, i) for i, c in enumerate(classes)]
    (root / "GT-final_test.csv").write_text(
        GTSRB_HEADER + "".join(rows)
    )  # where GTSRB_Final_Test_GT.zip puts it


# ---------------------------------------------------------------- idx: mnist, fashion-mnist
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_load_exactly(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / "d", gz=gz)
    d = load_dataset(name, data_dir=tmp_path / "d")
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(d.test_y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert d.info == dataset_info(name) and d.info.num_classes == 10 and d.info.crop_padding == 2
    assert d.info.flip is (name == "fashion-mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_names_file_and_fix(tmp_path, gz):
    write_idx_set(tmp_path, gz=gz)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[:-200])
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in str(err.value) and "download=True" in str(err.value)


def test_idx_wrong_magic_and_label_count(tmp_path):
    write_idx_set(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(9, dtype=np.uint8))  # 10 test images, 9 labels
    with pytest.raises(DataError, match="one per image"):
        load_dataset("mnist", data_dir=tmp_path)
    labels.write_bytes(b"\x00\x00\x0d\x01" + labels.read_bytes()[4:])  # float idx, not ubyte
    with pytest.raises(DataError, match="not an idx1-ubyte file"):
        load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------- CIFAR and the restricted unpickler
@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_folder_and_tar(tmp_path, name, as_tar):
    batches = write_cifar(tmp_path, name, as_tar=as_tar)
    d = load_dataset(name, data_dir=tmp_path)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    train = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test = "test_batch" if name == "cifar10" else "test"
    want_x = np.concatenate([batches[m][b"data"] for m in train]).reshape(-1, 3, 32, 32)
    assert torch.equal(d.train_x, torch.from_numpy(want_x))
    assert d.train_y.tolist() == sum((batches[m][key] for m in train), [])
    assert d.test_y.tolist() == batches[test][key] and d.test_x.shape == (3, 3, 32, 32)
    assert d.info.num_classes == (10 if name == "cifar10" else 100) and d.info.flip


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_from_python3_protocols(tmp_path, protocol):
    write_cifar(tmp_path, "cifar10", protocol=protocol)
    assert load_dataset("cifar10", data_dir=tmp_path).train_x.shape == (20, 3, 32, 32)


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsExec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsExec])
@pytest.mark.parametrize("as_tar", [False, True])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload, as_tar):
    root, marker = tmp_path / "root", tmp_path / "pwned"
    root.mkdir()
    write_cifar(root, "cifar10")
    evil = {b"data": payload(marker), b"labels": [0]}
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        (root / "cifar-10-batches-py").rename(tmp_path / "moved")
    with pytest.raises(DataError, match="refusing to unpickle") as err:
        load_dataset("cifar10", data_dir=root)
    assert "data_batch_3" in str(err.value) and ("system" in str(err.value) or "exec" in str(err.value))
    assert not marker.exists()


def test_cifar_missing_batch_and_damaged_tar(tmp_path):
    write_cifar(tmp_path / "a", "cifar10")
    (tmp_path / "a" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "a")
    write_cifar(tmp_path / "b", "cifar10", as_tar=True)
    archive = tmp_path / "b" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("cifar10", data_dir=tmp_path / "b")


# ---------------------------------------------------------------- SVHN
def test_svhn_layout_and_label_ten_is_zero(tmp_path):
    xs, ys = write_svhn(tmp_path / "train_32x32.mat", 7)
    write_svhn(tmp_path / "test_32x32.mat", 5)
    d = load_dataset("svhn", data_dir=tmp_path)
    assert d.train_x.shape == (7, 3, 32, 32) and d.test_x.shape == (5, 3, 32, 32)
    assert int(d.train_x[4, 1, 2, 3]) == int(xs[2, 3, 1, 4])  # X is [H, W, C, N]
    want = ys[:, 0].astype(np.int64) % 10
    assert d.train_y.tolist() == want.tolist() and d.train_y[0] == 0 and int(d.train_y.max()) <= 9
    assert d.info.flip is False


def test_svhn_truncated(tmp_path):
    write_svhn(tmp_path / "train_32x32.mat", 7)
    write_svhn(tmp_path / "test_32x32.mat", 5)
    mat = tmp_path / "test_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:1000])
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)


# ---------------------------------------------------------------- GTSRB
def test_gtsrb_crops_roi_and_reads_labels(tmp_path):
    write_gtsrb(tmp_path)
    d = load_dataset("gtsrb", data_dir=tmp_path)
    assert d.train_x.shape == (6, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.train_y.tolist() == [0, 0, 14, 14, 42, 42] and d.test_y.tolist() == [0, 14, 42]
    # the ROI (x2, y2 exclusive) is uniform, so crop + resize gives that colour exactly, no black margin
    for k, (c, i) in enumerate([(0, 0), (0, 1), (14, 0), (14, 1), (42, 0), (42, 1)]):
        want = torch.tensor(sign_color(c, i), dtype=torch.uint8)[:, None, None].expand(3, 32, 32)
        assert torch.equal(d.train_x[k], want)
    assert d.info.num_classes == 43 and len(d.info.classes) == 43 and d.info.flip is False


def test_gtsrb_missing_image_and_unlabelled_test_csv(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Training" / "Images" / "00014" / "00000_00001.ppm").unlink()
    with pytest.raises(DataError, match="00000_00001.ppm"):
        load_dataset("gtsrb", data_dir=tmp_path)
    write_gtsrb(tmp_path / "b")
    (tmp_path / "b" / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n")
    with pytest.raises(DataError, match="GTSRB_Final_Test_GT.zip"):
        load_dataset("gtsrb", data_dir=tmp_path / "b")


# ---------------------------------------------------------------- finding files, names, options
def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    assert isinstance(err.value, ValueError)
    for name in ["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "gtsrb", "synthetic"]:
        assert name in str(err.value) and name in dataset_names()


def test_missing_files_say_where_and_how(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=nowhere)
    msg = str(err.value)
    assert str(nowhere) in msg and "cifar-10-python.tar.gz" in msg
    assert "download=True" in msg and "--download" in msg and "--data-dir" in msg and "QROBUST_DATA" in msg
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=nowhere)
    with pytest.raises(DataError, match=r"data/svhn"):
        load_dataset("svhn")  # default ./data/<name>


def test_env_var_and_name_subfolder(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "root" / "mnist")
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path / "root"))
    assert len(load_dataset("mnist").train_x) == 20
    write_idx_set(tmp_path / "explicit" / "mnist", n_train=7)
    assert len(load_dataset("MNIST", data_dir=tmp_path / "explicit").train_x) == 7  # explicit wins
    write_idx_set(tmp_path / "data" / "mnist", n_train=5)
    monkeypatch.delenv(files.DATA_ENV)
    assert len(load_dataset("mnist").train_x) == 5  # default ./data/<name>


def test_options_are_checked():
    with pytest.raises(ConfigError, match="takes no options"):
        load_dataset("mnist", num_train=5)
    with pytest.raises(ConfigError, match="num_trian.*num_train"):
        load_dataset("synthetic", num_trian=5)
    with pytest.raises(ConfigError, match="num_classes must be"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(ConfigError):
        load_dataset(None)


def test_image_data_and_info_validate():
    info = dataset_info("mnist")
    with pytest.raises(ConfigError, match="uint8"):
        ImageData(info, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), *load_synthetic_pair())
    with pytest.raises(ConfigError, match="one value per channel"):
        DatasetInfo("x", 2, 3, (8, 8), (0.5,), (0.2,), False, 0, ("a", "b"))


def load_synthetic_pair() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("synthetic", num_train=4, num_test=4)
    return d.test_x, d.test_y


# ---------------------------------------------------------------- downloads (file:// URLs, no network)
def serve(monkeypatch, name: str, folder: Path, md5s: dict[str, str] | None = None) -> None:
    """Point the resources of `name` at the files in `folder` (md5s override the true ones)."""
    md5s = md5s or {}
    res = tuple(
        files.Resource(
            r.filename,
            (folder / r.filename).as_uri(),
            md5s.get(r.filename, md5(folder / r.filename)),
            r.unzip,
        )
        for r in files.RESOURCES[name]
    )
    monkeypatch.setitem(files.RESOURCES, name, res)


def test_download_fetches_and_verifies(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path / "server")
    serve(monkeypatch, "mnist", tmp_path / "server")
    d = load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    assert torch.equal(d.train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(
        r.filename for r in files.RESOURCES["mnist"]
    )


def test_checksum_mismatch_discards_file(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "server")
    name = "t10k-images-idx3-ubyte.gz"
    serve(monkeypatch, "mnist", tmp_path / "server", {name: "0" * 32})
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    msg = str(err.value)
    assert name in msg and "0" * 32 in msg and md5(tmp_path / "server" / name) in msg
    assert not (tmp_path / "dl" / name).exists()
    assert not [p for p in (tmp_path / "dl").iterdir() if p.name.endswith(".part")]
    with pytest.raises(DataError, match="not found"):  # the bad file is not picked up later either
        load_dataset("mnist", data_dir=tmp_path / "dl")


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    res = files.Resource("train_32x32.mat", (tmp_path / "absent.mat").as_uri(), "0" * 32)
    monkeypatch.setitem(files.RESOURCES, "svhn", (res,))
    with pytest.raises(DataError, match="could not download"):
        load_dataset("svhn", data_dir=tmp_path / "dl", download=True)


def test_download_unzips_gtsrb(tmp_path, monkeypatch):
    write_gtsrb(tmp_path / "src")
    server = tmp_path / "server"
    server.mkdir()
    parts = {
        "GTSRB_Final_Training_Images.zip": "GTSRB/Final_Training",
        "GTSRB_Final_Test_Images.zip": "GTSRB/Final_Test",
        "GTSRB_Final_Test_GT.zip": "GT-final_test.csv",
    }
    for archive, member in parts.items():
        with zipfile.ZipFile(server / archive, "w") as zf:
            for f in [tmp_path / "src" / member, *(tmp_path / "src" / member).rglob("*")]:
                zf.write(f, f.relative_to(tmp_path / "src"))
    serve(monkeypatch, "gtsrb", server)
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path / "root"))
    d = load_dataset("gtsrb", download=True)  # goes to $QROBUST_DATA/gtsrb
    assert (tmp_path / "root" / "gtsrb" / "GTSRB" / "Final_Test" / "Images").is_dir()
    assert d.test_y.tolist() == [0, 14, 42]


# ---------------------------------------------------------------- split_indices
def test_split_indices_disjoint_sized_deterministic():
    s = split_indices(1000, {"victim": 0.5, "attacker": 0.29, "val": 0.2}, seed=3)
    assert {k: len(v) for k, v in s.items()} == {"victim": 500, "attacker": 290, "val": 200}
    joined = torch.cat(list(s.values()))
    assert joined.dtype == torch.int64 and len(joined.unique()) == 990 and int(joined.max()) < 1000
    again = split_indices(1000, {"val": 0.2, "attacker": 0.29, "victim": 0.5}, seed=3)
    assert all(torch.equal(s[k], again[k]) for k in s)  # independent of dict order
    other = split_indices(1000, {"victim": 0.5, "attacker": 0.29, "val": 0.2}, seed=4)
    assert not torch.equal(s["victim"], other["victim"])
    assert sum(len(v) for v in split_indices(7, {"a": 0.5, "b": 0.5}, 0).values()) <= 7


@pytest.mark.parametrize("fractions", [{"a": 0.7, "b": 0.4}, {"a": -0.1}, {"a": "half"}, {}])
def test_split_indices_rejects_bad_fractions(fractions):
    with pytest.raises(ConfigError):
        split_indices(10, fractions, 0)
    with pytest.raises(ConfigError, match="seed"):
        split_indices(10, {"a": 0.5}, "0")


# ---------------------------------------------------------------- BatchLoader
def toy(n: int = 50, c: int = 1, hw: int = 8, flip: bool = True, pad: int = 2):
    x = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    info = DatasetInfo("toy", 10, c, (hw, hw), (0.5,) * c, (0.25,) * c, flip, pad, tuple("abcdefghij"))
    return x, torch.arange(n), info  # labels = sample ids, to track order


def batches(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_shapes_dtype_layout():
    x, y, info = toy(n=50, c=3)
    loader = BatchLoader(x, y, 16, shuffle=True, augment=True, info=info)
    out = batches(loader)
    assert len(loader) == len(out) == 4 and [len(b[1]) for b in out] == [16, 16, 16, 2]
    xb, yb = out[0]
    assert xb.shape == (16, 3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.is_contiguous(memory_format=torch.channels_last) and xb.device.type == "cpu"
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
    assert len(BatchLoader(x, y, 16, drop_last=True)) == 3
    assert sorted(torch.cat([b[1] for b in out]).tolist()) == list(range(50))  # each sample once


def test_loader_plain_batches_are_the_data():
    x, y, _ = toy()
    xb, yb = next(iter(BatchLoader(x, y, 10)))
    assert torch.equal(yb, torch.arange(10)) and torch.equal(xb, x[:10].float() / 255)


def test_loader_same_seed_epoch_same_batches():
    x, y, info = toy()
    a = BatchLoader(x, y, 8, shuffle=True, augment=True, info=info, seed=5)
    b = BatchLoader(x, y, 8, shuffle=True, augment=True, info=info, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(batches(a), batches(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # iter() advances the epoch, so an uninterrupted run equals a resumed one
    a.set_epoch(0)
    first, second = batches(a), batches(a)
    b.set_epoch(1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(second, batches(b), strict=True))
    assert not torch.equal(first[0][1], second[0][1])  # another epoch, another order
    c = BatchLoader(x, y, 8, shuffle=True, augment=True, info=info, seed=6)
    assert not torch.equal(batches(c)[0][1], first[0][1])


def test_augmentation_changes_images_keeps_labels_and_is_a_shift_or_flip():
    x, y, info = toy(n=40, pad=2, flip=True)
    plain = batches(BatchLoader(x, y, 40, shuffle=True, seed=1))
    aug = batches(BatchLoader(x, y, 40, shuffle=True, augment=True, info=info, seed=1))
    assert torch.equal(plain[0][1], aug[0][1])  # same order, labels untouched
    assert not torch.equal(plain[0][0], aug[0][0])
    padded = F.pad(x, (2, 2, 2, 2)).float() / 255
    flipped = 0
    for img, i in zip(aug[0][0], aug[0][1].tolist(), strict=True):
        views = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        plain_match = any(torch.equal(img, v) for v in views)
        flip_match = any(torch.equal(img, v.flip(-1)) for v in views)
        assert plain_match or flip_match
        flipped += flip_match and not plain_match
    assert 5 <= flipped <= 35


def test_flip_only_when_info_says_so():
    x, y, info = toy(pad=0, flip=False)
    plain = batches(BatchLoader(x, y, 50, shuffle=True, seed=2))
    aug = batches(BatchLoader(x, y, 50, shuffle=True, augment=True, info=info, seed=2))
    assert torch.equal(plain[0][0], aug[0][0])
    info_flip = DatasetInfo(**{**info.__dict__, "flip": True})
    xb, yb = batches(BatchLoader(x, y, 50, augment=True, info=info_flip, seed=2))[0]
    same = [torch.equal(xb[k], x[k].float() / 255) for k in range(50)]
    mirrored = [torch.equal(xb[k], x[k].flip(-1).float() / 255) for k in range(50)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 5 < sum(mirrored) < 45


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.zeros(4, 1, 8, 8)}, "uint8"),
        ({"batch_size": 0}, "batch_size"),
        ({"augment": True, "info": None}, "needs info"),
        ({"y": torch.zeros(3)}, "one per image"),
        ({"device": "gpu0"}, "unknown device"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, match):
    x, y, info = toy(n=4)
    args = {"x": x, "y": y, "batch_size": 2, "info": info, **kwargs}
    with pytest.raises(ConfigError, match=match):
        BatchLoader(args.pop("x"), args.pop("y"), args.pop("batch_size"), **args)
    with pytest.raises(ConfigError):
        BatchLoader(x, y, 2).set_epoch(-1)


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_learnable():
    a = load_dataset("synthetic")
    b = load_dataset("synthetic", data_dir="ignored")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (512, 1, 28, 28) and a.test_x.shape == (256, 1, 28, 28)
    assert torch.bincount(a.train_y).tolist() == [52] * 2 + [51] * 8
    c = load_dataset("synthetic", num_train=30, num_test=20, num_classes=3, channels=3, size=16, seed=1)
    assert c.train_x.shape == (30, 3, 16, 16) and c.info.channels == 3 and len(c.info.mean) == 3

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = BatchLoader(a.train_x, a.train_y, 64, shuffle=True, augment=True, info=a.info)
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(a.test_x.float() / 255).argmax(1) == a.test_y).float().mean().item()
    assert acc > 0.9


def test_errors_are_qrobust_errors():
    assert issubclass(DataError, QrobustError) and issubclass(ConfigError, QrobustError)
    assert set(data.__all__) >= {"BatchLoader", "DatasetInfo", "ImageData", "load_dataset", "split_indices"}


# ---------------------------------------------------------------- the real Fashion-MNIST
# Debian re-compresses the .gz files (their md5 differs from the official ones); the content must not.
OFFICIAL_RAW_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.mark.slow
@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} is absent: install the Debian package dataset-fashion-mnist to run this test",
)
def test_real_fashion_mnist():
    d = load_dataset("fashion-mnist")  # (no timing assertion: CI machines differ in speed)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert (
        torch.bincount(d.train_y).tolist() == [6000] * 10 and torch.bincount(d.test_y).tolist() == [1000] * 10
    )
    counts = torch.bincount(d.train_x.flatten(), minlength=256).double()  # exact stats, no 376 MB copy
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = float((counts * values).sum() / counts.sum())
    std = float(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    assert abs(mean - d.info.mean[0]) < 1e-3 and abs(std - d.info.std[0]) < 1e-3
    for name, want in OFFICIAL_RAW_MD5.items():
        assert hashlib.md5(gzip.decompress((DEBIAN_FASHION / name).read_bytes())).hexdigest() == want


def test_pickle_allowlist_is_small():
    from qrobust.datasets.cifar import RestrictedUnpickler

    allowed = RestrictedUnpickler(io.BytesIO(b""), "x").allowed
    assert {m.split(".")[0] for m, _ in allowed} <= {"numpy", "_codecs"}
