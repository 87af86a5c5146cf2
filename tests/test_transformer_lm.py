"""The character-level transformer example (examples/transformer_lm.py) and its
data (examples/text_data.py): the split and windows, what the capture sees in a
scanned GPT with bias-free attention and an optional tied output (from shapes:
no compilation), and the ``--small`` run end to end (it writes its JSON).

Time budget: the whole file in about 25 s on a quiet two-core machine. The
statistics' values of stacked layers, embeddings and attend, and every
optimizer on a boxed transformer, are tested in the capture's own tests; here
the example's model is checked by shape, and the end-to-end run trains Adam
and Eva (the comparison the README discusses) in a subprocess with the XLA
flags that cut compilation ~5x (tests/multidevice_util.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)

import text_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformer_lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from multidevice_util import FAST_COMPILE  # pylint: disable=g-import-not-at-top,wrong-import-position
from multidevice_util import script_env  # pylint: disable=g-import-not-at-top,wrong-import-position

# ----------------------------------------------------------------------------
# Data.


def _corpus(n: int = 20_000) -> text_data.Corpus:
  # Random characters: every window of 17 occurs once, so where a window
  # lies identifies the region it was drawn from.
  rng = np.random.default_rng(0)
  text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz ,."), size=n))
  return text_data.Corpus(text=text, name="letters", source="test")


def test_vocabulary_round_trip_and_unknown_character():
  vocab = text_data.Vocabulary.of("hello, world")
  assert vocab.chars == " ,dehlorw"
  ids = vocab.encode("world, hello")
  assert ids.dtype == np.int32 and vocab.decode(ids) == "world, hello"
  with pytest.raises(ValueError, match="'z'"):
    vocab.encode("z")


def test_split_is_by_position_and_windows_are_shifted_by_one():
  tokens = np.arange(1000, dtype=np.int32)
  train, val = text_data.split_by_position(tokens, 0.1)
  np.testing.assert_array_equal(train, np.arange(900))
  np.testing.assert_array_equal(val, np.arange(900, 1000))
  x, y = text_data.windows(tokens, np.array([0, 17, 990 - 1]), 10)
  np.testing.assert_array_equal(x[1], np.arange(17, 27))
  np.testing.assert_array_equal(y, x + 1)     # next character
  with pytest.raises(ValueError, match="past the end"):
    text_data.windows(tokens, np.array([990]), 10)


def test_splits_keep_the_sweep_and_validation_text_apart():
  corpus = _corpus()
  context, n_fit, n_sw = 16, 200, 50
  s = text_data.make_splits(corpus, context=context, n_train=n_fit,
                            n_sweep_val=n_sw, n_val=40, seed=3)
  assert s.x_train.shape == (n_fit + n_sw, context) == s.y_train.shape
  assert s.x_val.shape == (40, context)
  tokens = s.vocab.encode(corpus.text)
  n_train_text = int(round(len(tokens) * 0.9))
  cut = int(round(n_train_text * 0.9))

  def positions(x, y, region):
    # Where each window (inputs and the last target) lies in `region`.
    view = np.lib.stride_tricks.sliding_window_view(region, context + 1)
    where = {}
    for p, w in enumerate(view):
      where.setdefault(w.tobytes(), []).append(p)
    out = []
    for xi, yi in zip(x, y):
      w = np.concatenate([xi, yi[-1:]]).astype(region.dtype)
      assert w.tobytes() in where, "a window that is not in its region"
      out.append(where[w.tobytes()])
    assert all(len(h) == 1 for h in out)
    return out

  fit = positions(s.x_train[:n_fit], s.y_train[:n_fit], tokens[:cut])
  sweep = positions(s.x_train[n_fit:], s.y_train[n_fit:],
                    tokens[cut:n_train_text])
  val = positions(s.x_val, s.y_val, tokens[n_train_text:])
  assert len(fit) == n_fit and len(sweep) == n_sw and len(val) == 40
  # The validation windows are evenly spaced and do not overlap.
  starts = [h[0] for h in val]
  assert all(b - a >= context for a, b in zip(starts, starts[1:]))
  # Same seed, same windows; another seed, other windows.
  again = text_data.make_splits(corpus, context=context, n_train=n_fit,
                                n_sweep_val=n_sw, n_val=40, seed=3)
  np.testing.assert_array_equal(again.x_train, s.x_train)
  other = text_data.make_splits(corpus, context=context, n_train=n_fit,
                                n_sweep_val=n_sw, n_val=40, seed=4)
  assert not np.array_equal(other.x_train, s.x_train)


def test_load_text_file_and_directory(tmp_path):
  (tmp_path / "b.txt").write_text("second " * 1000)
  (tmp_path / "a.txt").write_text("first " * 2000)
  (tmp_path / "skip.md").write_text("not read")
  both = text_data.load_text(str(tmp_path))
  assert both.text.startswith("first ") and "second" in both.text
  assert "not read" not in both.text
  one = text_data.load_text(str(tmp_path / "a.txt"))
  assert one.text == "first " * 2000
  with pytest.raises(FileNotFoundError, match="no such file"):
    text_data.load_text(str(tmp_path / "missing.txt"))
  (tmp_path / "tiny.txt").write_text("too short")
  with pytest.raises(ValueError, match="at least"):
    text_data.load_text(str(tmp_path / "tiny.txt"))


def test_kjv_missing_says_how(monkeypatch):
  monkeypatch.setattr(text_data, "KJV_DATA", "/nonexistent/bible.data")
  with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
    text_data.load_kjv()


def test_kjv_is_the_whole_text_without_references():
  """`make data` installs bible-kjv; its text, references stripped, is the
  one whose hash is recorded (Debian 12's 4.38)."""
  corpus = text_data.load_kjv()
  lines = corpus.text.splitlines()
  assert lines[0] == ("In the beginning God created the heaven and the "
                      "earth.")
  assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
  assert len(lines) == 31102          # the verses of the KJV
  assert corpus.sha256 == text_data.KJV_SHA256


# ----------------------------------------------------------------------------
# The model as the capture sees it (shapes only: jax.eval_shape traces, never
# compiles).

W, V, T, L = 16, 11, 8, 2     # width, vocabulary, context, blocks


@functools.lru_cache(maxsize=None)
def _shapes(tie: bool):
  model = transformer_lm.CharGPT(vocab=V, context=T, width=W, layers=L,
                                 heads=2, tie=tie)
  x = jnp.zeros((3, T), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  loss_fn = transformer_lm.lm_loss(model)
  _, grads, stats = jax.eval_shape(eva_optax.value_and_grad(loss_fn),
                                   params, x, x)
  views = eva_optax.layer_views(loss_fn, params, x, x)
  return params, grads, stats, views


@pytest.mark.parametrize("tie", [False, True])
def test_every_linear_layer_is_captured_with_the_stack(tie):
  params, grads, stats, views = _shapes(tie)
  blocks = stats["blocks"]
  for name in ("query", "key", "value", "out"):
    st = blocks["attn"][name]
    assert st.captured, (name, st.note)
    assert st.view.stack == (L,)
    # Bias-free DenseGeneral(features=(heads, head_dim)) read as (16, 2 * 8);
    # the output projection (heads, head_dim) -> width as (2 * 8, 16).
    assert (st.view.d_in, st.view.d_out) == (W, W), name
    assert views["blocks"]["attn"][name].stack == (L,)
  for name, d_in, d_out in (("mlp_in", W + 1, 4 * W), ("mlp_out", 4 * W + 1, W)):
    st = blocks[name]
    assert st.captured and st.view.stack == (L,)
    assert st.a.shape == (L, d_in) and st.g.shape == (L, d_out)
  for name, rows in (("tok_embed", V), ("pos_embed", T)):
    assert stats[name].captured, stats[name].note
    assert stats[name].a.shape == (rows,) and stats[name].g.shape == (W,)
  # Tied: the token embedding is also the output layer, and there is no head.
  assert ("head" in params) == (not tie) == ("head" in stats)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("tie", [False, True])
def test_preconditioned_fractions_count_the_parameters(tie):
  """Counted by hand. Layer-wise: everything but the LayerNorms. Per tensor
  (Eva-s, Shampoo, each slice of a stack its own tensor): the kernels and
  embeddings; not the MLP biases (vectors of a stacked layer), the scanned
  LayerNorms' (blocks, width) stacks (one vector per block) nor the final
  LayerNorm."""
  params, _, stats, views = _shapes(tie)
  embed = V * W + T * W
  block = 4 * W * W + (W * 4 * W + 4 * W) + (4 * W * W + W)
  block_norms, out_norm = L * 2 * 2 * W, 2 * W
  head = 0 if tie else W * V
  total = embed + L * block + block_norms + out_norm + head
  info = transformer_lm.preconditioned(stats, params, views)
  assert info["total"] == total
  assert info["layerwise"]["parameters"] == total - block_norms - out_norm
  mlp_biases = L * (4 * W + W)
  assert info["per_tensor"]["parameters"] == total - out_norm - mlp_biases - block_norms
  assert transformer_lm.fraction_of("eva", info) == (
      (total - block_norms - out_norm) / total)
  assert transformer_lm.fraction_of("shampoo", info) == (
      info["per_tensor"]["parameters"] / total)
  assert transformer_lm.fraction_of("sgd", info) == 0.0
  assert transformer_lm.fraction_of("adam", info) == 1.0
  assert set(info["plain_gradient"]["layerwise"]) == {
      "blocks/ln_attn/bias", "blocks/ln_attn/scale", "blocks/ln_mlp/bias",
      "blocks/ln_mlp/scale", "ln_out/bias", "ln_out/scale"}
  assert set(info["plain_gradient"]["per_tensor"]) == {
      "blocks/mlp_in/bias", "blocks/mlp_out/bias", "ln_out/bias",
      "ln_out/scale", "blocks/ln_attn/bias", "blocks/ln_attn/scale",
      "blocks/ln_mlp/bias", "blocks/ln_mlp/scale"}
  # Without the views every leaf of rank >= 2 counts, the MLP biases too.
  flat = transformer_lm.preconditioned(stats, params, None)
  assert flat["per_tensor"]["parameters"] == total - out_norm


def test_views_go_to_every_preconditioner_and_not_to_sgd_or_adam():
  views = {"some": "views"}
  names = list(transformer_lm.DEFAULT_OPTIMIZERS) + ["foof"]
  options = transformer_lm.optimizer_options(names, views)
  for n in ("eva", "eva_f", "kfac", "foof", "eva_s", "shampoo"):
    assert options[n]["layer_views"] is views, n
  assert "layer_views" not in options["sgd"] and options["adam"] == {}
  assert options["kfac"]["inverse_every"] == 10
  unrolled = transformer_lm.optimizer_options(names, None)
  assert all("layer_views" not in o for o in unrolled.values())


# ----------------------------------------------------------------------------
# The example end to end.


def test_small_run_writes_its_json(tmp_path):
  out = tmp_path / "out"
  names = ["adam", "eva"]
  proc = subprocess.run(
      [sys.executable, os.path.join(EXAMPLES, "transformer_lm.py"), "--small",
       "--optimizers", ",".join(names), "--out", str(out), "--no-progress"],
      env=script_env(None, dict(FAST_COMPILE)), capture_output=True,
      text=True, timeout=600, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # describe() is printed: the stacked attention projections among them.
  assert "blocks/attn/query | DenseGeneral" in proc.stdout
  assert "kernel as 1 x (32, 32)" in proc.stdout
  path = out / "transformer_lm.json"
  assert path.is_file() and (out / "transformer_lm.png").is_file()
  saved = json.loads(path.read_text())
  assert list(saved["runs"]) == names
  steps = (transformer_lm.SMALL["train_windows"]
           + transformer_lm.SMALL["sweep_validation"]) // (
               transformer_lm.SMALL["batch_size"])
  log_v = np.log(saved["notes"]["data"]["vocabulary"])
  for name, run in saved["runs"].items():
    assert not run["diverged"], name
    assert run["steps_per_epoch"] == steps
    assert len(run["epochs"]) == transformer_lm.SMALL["epochs"]
    # Nats per character: below the uniform guess log(vocabulary) after a
    # few steps, and finite.
    losses = [e["test_loss"] for e in run["epochs"]]
    assert 0.5 < losses[-1] < log_v, (name, losses, log_v)
    assert 0.0 <= run["epochs"][-1]["test_accuracy"] <= 1.0
    assert np.isfinite(run["cosine_mean"])
  # Eva's direction is the preconditioned gradient: not the gradient itself.
  assert saved["runs"]["eva"]["cosine_mean"] < 0.9999
  notes = saved["notes"]
  assert notes["data"]["corpus"] == "kjv"
  assert notes["data"]["matches_debian_4_38"]
  fractions = notes["preconditioned_fraction"]
  assert fractions["adam"] == 1.0 and 0.9 < fractions["eva"] < 1.0
  assert notes["model"]["scan"] and notes["model"]["layers"] == 1
  assert saved["provenance"]["command"].endswith(
      "--out " + str(out) + " --no-progress")
