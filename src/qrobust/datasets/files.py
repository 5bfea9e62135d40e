"""Finding a data set's files, and downloading them with an md5 check.

Search order (the first folder that holds all of a set's files wins):

1. ``data_dir`` and ``data_dir/<name>`` when ``data_dir`` is given (then nowhere else);
2. ``$QROBUST_DATA/<name>`` and ``$QROBUST_DATA``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``) for
   fashion-mnist, then ``./data/<name>`` for every set.

A download goes to ``data_dir``, else ``$QROBUST_DATA/<name>``, else ``./data/<name>``. It is
written to a temporary file, checked against the published md5 and only then renamed into place,
so an interrupted or tampered download never looks like a data set.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qrobust.errors import DataError

DATA_ENV = "QROBUST_DATA"  # a root folder holding one sub-folder per data set
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Resource:
    """One official file: its name, where it lives and its published md5."""

    filename: str
    url: str
    md5: str
    unzip: bool = False  # GTSRB archives are unpacked next to themselves after the check


def _resources(base: str, files: dict[str, str], unzip: bool = False) -> tuple[Resource, ...]:
    return tuple(Resource(name, base + name, md5, unzip) for name, md5 in files.items())


_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {  # md5 of the official .gz files; Debian's re-compressed copies differ, their content does not
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_GTSRB_MD5 = {
    "GTSRB_Final_Training_Images.zip": "513f3c79a4c5141765e10e952eaa2478",
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": _resources("https://ossci-datasets.s3.amazonaws.com/mnist/", _MNIST_MD5),
    "fashion-mnist": _resources("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FASHION_MD5),
    "cifar10": _resources(
        "https://www.cs.toronto.edu/~kriz/", {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    ),
    "cifar100": _resources(
        "https://www.cs.toronto.edu/~kriz/", {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}
    ),
    "svhn": _resources(
        "http://ufldl.stanford.edu/housenumbers/",
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
    ),
    "gtsrb": _resources(
        "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/", _GTSRB_MD5, True
    ),
}
_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package (sudo apt-get install dataset-fashion-mnist), or "
}


@dataclass(frozen=True)
class Where:
    """The folders to search for a set's files, and where a download goes."""

    name: str
    search: tuple[Path, ...]
    target: Path
    download: bool


def where_for(name: str, data_dir: str | os.PathLike | None, download: bool) -> Where:
    """Resolve the search folders and download target of ``name`` (see the module docstring)."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return Where(name, (root, root / name), root, bool(download))
    env = os.environ.get(DATA_ENV)
    search = [Path(env).expanduser() / name, Path(env).expanduser()] if env else []
    if name == "fashion-mnist":
        search.append(DEBIAN_FASHION_MNIST)
    search.append(Path("data") / name)
    target = search[0] if env else Path("data") / name
    return Where(name, tuple(dict.fromkeys(search)), target, bool(download))


def find(folders: tuple[Path, ...], files: dict[str, tuple[str, ...]]) -> dict[str, Path] | None:
    """In the first folder that holds every file (under any of its alternative names), their paths."""
    for folder in folders:
        found = {}
        for key, names in files.items():
            hit = next((folder / n for n in names if (folder / n).exists()), None)
            if hit is None:
                break
            found[key] = hit
        else:
            return found
    return None


def locate(where: Where, files: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """Paths of a set's files (key -> alternative relative names); downloads them if allowed."""
    found = find(where.search, files)
    if found is None and where.download:
        download(RESOURCES[where.name], where.target)
        found = find((where.target,), files)
    if found is None:
        wanted = "; ".join(" or ".join(names) for names in files.values())
        searched = ", ".join(str(p) for p in where.search)
        raise DataError(
            f"{where.name}: data files not found. Looked for [{wanted}] in: {searched}. To fix: "
            f"{_HOW_TO_GET.get(where.name, '')}pass download=True (CLI: --download) to fetch them into "
            f"{where.target}, or pass the folder that holds them as data_dir (CLI: --data-dir), or set "
            f"{DATA_ENV} to a folder that holds {where.name}/"
        )
    return found


def refetch_hint(path: Path) -> str:
    """How to replace a damaged file: reinstall the Debian package or download it again."""
    if Path(path).is_relative_to(DEBIAN_FASHION_MNIST):
        return "reinstall it (sudo apt-get install --reinstall dataset-fashion-mnist)"
    return "delete it and fetch it again (download=True, CLI: --download)"


def read_bytes(path: Path) -> bytearray:
    """The (gunzipped, for ``.gz``) bytes of a file; a :class:`DataError` if it is damaged."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return bytearray(f.read())
        return bytearray(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} cannot be read ({e}): it is damaged or truncated; {refetch_hint(path)}"
        ) from None


def download(resources: tuple[Resource, ...], target: Path) -> None:
    """Fetch the resources missing from ``target`` (and unpack archives that need it)."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {target} for the download ({e}); pass a writable data_dir") from None
    for res in resources:
        dest = target / res.filename
        if not dest.exists():
            fetch(res.url, dest, res.md5)
        if res.unzip:
            unzip(dest, target)


def fetch(url: str, dest: Path, md5: str) -> None:
    """Download ``url`` to ``dest`` via a temporary file, kept only if its md5 is ``md5``."""
    tmp, digest = None, hashlib.md5(usedforsecurity=False)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            size = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise DataError(
                f"{dest.name} downloaded from {url} has md5 {digest.hexdigest()}, expected {md5}: it is damaged "
                "or was tampered with and was discarded; try again later, or fetch the file by hand"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {url} ({e}); check the network, or fetch the file by hand into {dest.parent}"
        ) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def unzip(archive: Path, target: Path) -> None:
    """Unpack a zip archive into ``target``."""
    # zipfile drops absolute paths and '..' parts, so no member can land outside `target`
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot unpack {archive} ({e}); {refetch_hint(archive)}") from None
