"""Offline data for the examples: Fashion-MNIST, scikit-learn digits, MNIST-1D.

Nothing here touches the network unless asked to (``download=True`` or
``EVA_OPTAX_DOWNLOAD=1``, for Fashion-MNIST only).

* :func:`load_fashion_mnist`: the real 60,000 + 10,000 28x28 release, read from
  its four idx ``.gz`` files. Looked for, in order, in ``data_dir``,
  ``$EVA_OPTAX_FMNIST_DIR`` and ``/usr/share/datasets/fashion-mnist`` (where the
  Debian/Ubuntu package ``dataset-fashion-mnist`` puts them; ``make data``
  installs it).
* :func:`load_digits`: scikit-learn's bundled 8x8 digits (1,797 images).
* :func:`load_mnist1d`: MNIST-1D, generated locally by the ``mnist1d`` package
  (its ``make_dataset``, never its downloader).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from typing import NamedTuple

import numpy as np

FMNIST_ENV_DIR = "EVA_OPTAX_FMNIST_DIR"
DOWNLOAD_ENV = "EVA_OPTAX_DOWNLOAD"
FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# The official release (github.com/zalandoresearch/fashion-mnist, README
# "Get the Data"); the GitHub copy is the same files, tried second.
FMNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)


class _IdxFile(NamedTuple):
  name: str
  magic: int  # 2049 for labels (idx1, uint8), 2051 for images (idx3, uint8).
  shape: tuple[int, ...]
  # SHA-256 of the DECOMPRESSED idx payload. Computed from the Debian package
  # dataset-fashion-mnist (0.0~git20200523.55506a9-1, packaged from the
  # upstream repository), whose .gz files are recompressed (their own hashes
  # differ from upstream's), so the check is on the content, which is what
  # matters and does not depend on how a mirror gzipped it.
  sha256: str


FMNIST_FILES = {
    "train_images": _IdxFile(
        "train-images-idx3-ubyte.gz", 2051, (60000, 28, 28),
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": _IdxFile(
        "train-labels-idx1-ubyte.gz", 2049, (60000,),
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": _IdxFile(
        "t10k-images-idx3-ubyte.gz", 2051, (10000, 28, 28),
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": _IdxFile(
        "t10k-labels-idx1-ubyte.gz", 2049, (10000,),
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class Split(NamedTuple):
  """Train and test arrays of one data set."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def _not_found_message(searched: list[str]) -> str:
  where = "\n".join(f"  - {d}" for d in searched) or "  (nowhere)"
  return (
      "Fashion-MNIST idx files (train-images-idx3-ubyte.gz, "
      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
      "t10k-labels-idx1-ubyte.gz) were not found in:\n"
      f"{where}\n"
      "Get them in one of three ways:\n"
      "  1. Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
      f"(installs them in {FMNIST_SYSTEM_DIR}; `make data` does this);\n"
      "  2. put the four files in a directory and pass data_dir=... or set "
      f"{FMNIST_ENV_DIR}=that/directory;\n"
      "  3. where a network exists, download=True or "
      f"{DOWNLOAD_ENV}=1 (the official files, checksum-verified).")


def _read_idx(path: str, spec: _IdxFile, verify: bool = True) -> np.ndarray:
  """Reads one gzipped idx file, checking magic, shape and (optionally) hash."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f"{path}: too short for an idx file ({len(raw)} bytes).")
  magic, = struct.unpack(">i", raw[:4])
  ndim = magic & 0xFF
  if magic != spec.magic or ndim != len(spec.shape):
    raise ValueError(f"{path}: idx magic {magic}, expected {spec.magic}.")
  dims = struct.unpack(">" + "i" * ndim, raw[4:4 + 4 * ndim])
  if tuple(dims) != spec.shape:
    raise ValueError(f"{path}: shape {dims}, expected {spec.shape}.")
  offset = 4 + 4 * ndim
  if len(raw) != offset + int(np.prod(dims)):
    raise ValueError(f"{path}: {len(raw)} bytes, expected "
                     f"{offset + int(np.prod(dims))}.")
  if verify:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
      raise ValueError(
          f"{path}: SHA-256 of the decompressed content is {digest}, expected "
          f"{spec.sha256} (the official Fashion-MNIST release). The file is "
          "corrupt or not Fashion-MNIST; delete it and fetch it again.")
  return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _has_all(directory: str) -> bool:
  return all(os.path.isfile(os.path.join(directory, s.name))
             for s in FMNIST_FILES.values())


def default_download_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "eva_optax",
                      "fashion-mnist")


def download_fashion_mnist(directory: str | None = None) -> str:
  """Downloads the four official Fashion-MNIST files, verified, into ``directory``.

  Each file is fetched to a temporary name, its decompressed content checked
  (idx magic, shape, size and SHA-256), and only then moved in place.

  Returns:
    The directory holding the four files.
  """
  directory = directory or default_download_dir()
  os.makedirs(directory, exist_ok=True)
  for spec in FMNIST_FILES.values():
    dest = os.path.join(directory, spec.name)
    if os.path.isfile(dest):
      try:
        _read_idx(dest, spec)
        continue
      except (ValueError, OSError, EOFError):
        os.remove(dest)
    errors = []
    for base in FMNIST_URLS:
      url = base + spec.name
      fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
      os.close(fd)
      try:
        print(f"Downloading {url}")
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
          shutil.copyfileobj(r, f)
        _read_idx(tmp, spec)
        os.replace(tmp, dest)
        break
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"{url}: {e}")
        if os.path.exists(tmp):
          os.remove(tmp)
    else:
      raise OSError(f"Could not download {spec.name}:\n  " +
                    "\n  ".join(errors))
  return directory


def find_fashion_mnist(data_dir: str | None = None) -> tuple[str | None, list[str]]:
  """The first directory holding the four files, and the list searched."""
  candidates = [data_dir, os.environ.get(FMNIST_ENV_DIR), FMNIST_SYSTEM_DIR]
  searched = []
  for d in candidates:
    if not d:
      continue
    d = os.path.expanduser(d)
    searched.append(d)
    if _has_all(d):
      return d, searched
  return None, searched


def load_fashion_mnist(data_dir: str | None = None,
                       download: bool = False) -> Split:
  """Fashion-MNIST: images float32 in [0, 1], shape (N, 28, 28); labels int32.

  Args:
    data_dir: a directory with the four idx ``.gz`` files; searched first,
      then ``$EVA_OPTAX_FMNIST_DIR``, then ``/usr/share/datasets/fashion-mnist``.
    download: when none of those has them, download the official files into
      ``data_dir`` (or ``~/.cache/eva_optax/fashion-mnist``), verified.
      ``EVA_OPTAX_DOWNLOAD=1`` in the environment does the same.

  Returns:
    ``Split(x_train (60000, 28, 28), y_train (60000,), x_test (10000, 28, 28),
    y_test (10000,))``.

  Raises:
    FileNotFoundError: nothing found and no download asked for; the message
      lists the three ways to get the files.
  """
  directory, searched = find_fashion_mnist(data_dir)
  if directory is None:
    if not download:
      download = os.environ.get(DOWNLOAD_ENV, "").lower() in ("1", "true",
                                                              "yes")
    if not download:
      raise FileNotFoundError(_not_found_message(searched))
    directory = download_fashion_mnist(
        os.path.expanduser(data_dir) if data_dir else None)
  arrays = {k: _read_idx(os.path.join(directory, s.name), s)
            for k, s in FMNIST_FILES.items()}
  to_float = lambda a: (a.astype(np.float32) / 255.0)
  return Split(to_float(arrays["train_images"]),
               arrays["train_labels"].astype(np.int32),
               to_float(arrays["test_images"]),
               arrays["test_labels"].astype(np.int32))


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
  """scikit-learn's 8x8 digits: images float32 in [0, 1], shape (N, 8, 8).

  A stratified split with ``test_fraction`` of the 1,797 images held out.
  """
  from sklearn import datasets as skdatasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = skdatasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return Split(x_tr, y_tr, x_te, y_te)


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
  """MNIST-1D, generated locally: signals float32 (N, 40), labels int32.

  Uses ``mnist1d.data.make_dataset`` with the package's default arguments
  (80/20 train/test split), never its downloader. Note that ``make_dataset``
  reseeds NumPy's and Python's global random generators.
  """
  from mnist1d import data as m1d  # pylint: disable=g-import-not-at-top
  args = m1d.get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  d = m1d.make_dataset(args)
  return Split(d["x"].astype(np.float32), d["y"].astype(np.int32),
               d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))
