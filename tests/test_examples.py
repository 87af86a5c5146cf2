"""The examples, their data loading and the quickstart notebook run (small settings)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)

import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import float32_tol  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import propagated_bound  # pylint: disable=g-import-not-at-top,wrong-import-position

def needs_fmnist(test):
  """Marks a test that reads Fashion-MNIST. `make test` installs it first
  (`make data`); without it the test fails with the loader's message that says
  how to install it, never skips."""
  return test


# ----------------------------------------------------------------------------
# Data.


@needs_fmnist
def test_load_fashion_mnist_shapes():
  d = datasets.load_fashion_mnist()
  assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
  assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
  assert d.x_train.dtype == np.float32
  assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
  assert set(np.unique(d.y_test)) == set(range(10))
  # Balanced classes: 6,000 / 1,000 images each.
  assert np.all(np.bincount(d.y_train) == 6000)
  assert np.all(np.bincount(d.y_test) == 1000)


def test_load_fashion_mnist_missing_says_how(monkeypatch, tmp_path):
  monkeypatch.delenv(datasets.FMNIST_ENV_DIR, raising=False)
  monkeypatch.delenv(datasets.DOWNLOAD_ENV, raising=False)
  monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError) as e:
    datasets.load_fashion_mnist(str(tmp_path / "empty"))
  msg = str(e.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert datasets.FMNIST_ENV_DIR in msg and "download=True" in msg


@needs_fmnist
def test_download_verifies_content(monkeypatch, tmp_path):
  """The download path, against a local 'mirror' (file:// URLs): a good mirror
  passes the checksum; a corrupt file is rejected and not kept."""
  src = datasets.find_fashion_mnist()[0]
  monkeypatch.setattr(datasets, "FMNIST_URLS", ("file://" + src + "/",))
  out = datasets.download_fashion_mnist(str(tmp_path / "good"))
  for spec in datasets.FMNIST_FILES.values():
    assert os.path.isfile(os.path.join(out, spec.name))
  d = datasets.load_fashion_mnist(out)
  assert d.x_test.shape == (10000, 28, 28)

  import gzip  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad_mirror"
  bad.mkdir()
  spec = datasets.FMNIST_FILES["test_labels"]
  with gzip.open(os.path.join(src, spec.name), "rb") as f:
    raw = bytearray(f.read())
  raw[100] = (raw[100] + 1) % 10   # one wrong label
  with gzip.open(bad / spec.name, "wb") as f:
    f.write(bytes(raw))
  monkeypatch.setattr(datasets, "FMNIST_URLS", ("file://" + str(bad) + "/",))
  monkeypatch.setattr(datasets, "FMNIST_FILES", {"test_labels": spec})
  with pytest.raises(OSError, match="SHA-256"):
    datasets.download_fashion_mnist(str(tmp_path / "rejected"))
  assert not os.path.exists(tmp_path / "rejected" / spec.name)


def test_load_digits_and_mnist1d():
  d = datasets.load_digits()
  assert d.x_train.shape[1:] == (8, 8) and len(d.x_train) + len(d.x_test) == 1797
  assert d.x_train.max() <= 1.0
  m = datasets.load_mnist1d(num_samples=500)
  assert m.x_train.shape == (400, 40) and m.x_test.shape == (100, 40)
  assert m.y_train.dtype == np.int32


# ----------------------------------------------------------------------------
# Quickstart script and notebook.


def test_quickstart_main():
  import quickstart  # pylint: disable=g-import-not-at-top
  results = quickstart.main(epochs=2, lr=0.1, seed=0)
  for name in ("sgd", "eva"):
    h = results[name]
    assert len(h["test_loss"]) == 2 and np.all(np.isfinite(h["test_loss"]))
    assert h["test_accuracy"][-1] > 0.7   # 10 classes: chance is 0.1


def test_notebook_executes(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Committed without outputs.
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  params[0].source = "EPOCHS = 1\nLR = 0.1\nSEED = 0"
  assert "colab.research.google.com" in nb.cells[0].source
  # The Colab install cell (tagged "install") must never pip install here: it is skipped.
  install = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
  assert len(install) == 1 and "pip" in install[0].source
  install[0].source = "# install cell skipped by tests/test_examples.py"
  client = nbclient.NotebookClient(
      nb, timeout=240, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "".join(o.get("text", "") for o in outputs)
  assert "eva  test accuracy" in text and "sgd  test accuracy" in text


# ----------------------------------------------------------------------------
# Harness.


def _digits_task():
  import quickstart  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss_and_metrics(logits, x, y):
    del x
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

  d = datasets.load_digits()
  return harness.Task(name="digits", model=quickstart.MLP(hidden=32),
                      loss_and_metrics=loss_and_metrics, x_train=d.x_train,
                      y_train=d.y_train, x_test=d.x_test, y_test=d.y_test,
                      batch_size=64, eval_batch_size=256)


def _fake_sweep(task, names, centers, **kw):
  """What harness.sweep.lr_sweep returns, without training (tested below)."""
  return {"epochs": kw["epochs"], "optimizers": {n: {
      "center": centers[n], "chosen": centers[n] * 3,
      "results": [{"learning_rate": centers[n] * f, "val_loss": 1.0 / f}
                  for f in (1 / 3, 1.0, 3.0)]} for n in names}}


def test_harness_writes_json_and_png(tmp_path, monkeypatch):
  task = _digits_task()
  monkeypatch.setattr(harness.sweep, "lr_sweep", _fake_sweep)
  p = argparse.ArgumentParser()
  harness.add_common_args(p, "digits", {n: 0.03 for n in harness.OPTIMIZERS})
  args = p.parse_args([
      "--optimizers", "sgd,eva", "--epochs", "1", "--train-subset", "640",
      "--out", str(tmp_path), "--no-progress", "--sweep", "--sweep-epochs",
      "1"])
  record = harness.run_comparison(task, args, title="digits", options={})
  with open(tmp_path / "digits.json") as f:
    saved = json.load(f)
  assert os.path.getsize(tmp_path / "digits.png") > 1000
  for key in ("runs", "provenance", "config", "learning_rates", "sweep",
              "table", "loss_name"):
    assert key in saved, key
  prov = saved["provenance"]
  assert set(prov["versions"]) >= {"python", "jax", "jaxlib", "flax", "optax",
                                   "eva_optax"}
  assert len(prov["git"]["commit"]) == 40 and "command" in prov
  assert prov["device"]["kind"] and prov["date"]
  assert set(saved["sweep"]["optimizers"]) == {"sgd", "eva"}
  for name in ("sgd", "eva"):
    run = saved["runs"][name]
    # The runs train at the sweep's choice.
    assert saved["learning_rates"][name] == pytest.approx(0.09)
    assert run["hyperparameters"]["learning_rate"] == pytest.approx(0.09)
    for key in ("epochs", "wall_time_s", "median_step_s", "state_bytes",
                "hyperparameters", "cosine_mean", "compile_time_s"):
      assert key in run, (name, key)
    # The compiled step holds at least the parameters and the state.
    mem = run["step_memory_bytes"]
    assert mem["argument"] >= run["param_bytes"] + run["state_bytes"]
    (epoch,) = run["epochs"]
    for key in ("train_loss", "test_loss", "test_accuracy", "train_time_s"):
      assert np.isfinite(epoch[key]), (name, key)
    assert run["steps_per_epoch"] == 10 and run["state_bytes"] > 0
    assert epoch["ref_step_s"] > 0 and run["step_ratio_vs_sgd"] > 0
  assert run["cosine_of"].startswith("preconditioned")
  # A float32 cosine over the N parameters: <a, b>, |a|^2 and |b|^2 are sums of
  # N products (N roundings each, on positive terms for SGD's cos(g, g) = 1),
  # then a product, a root and a division.
  cos_tol = {name: float32_tol(1.0, 2 * saved["runs"][name]["param_bytes"] / 4 + 3)
             for name in ("sgd", "eva")}
  assert -1.0 <= saved["runs"]["eva"]["cosine_mean"] <= 1.0 + cos_tol["eva"]
  assert abs(saved["runs"]["sgd"]["cosine_mean"] - 1.0) < cos_tol["sgd"]
  assert "| Eva |" in record["table"] and "| SGD |" in record["table"]
  assert "epoch reaching it" in record["table"]

  # --append adds a run to the same record and redraws.
  args = p.parse_args([
      "--optimizers", "adam", "--epochs", "1", "--train-subset", "640",
      "--out", str(tmp_path), "--no-progress", "--append"])
  record = harness.run_comparison(task, args, title="digits", options={})
  with open(tmp_path / "digits.json") as f:
    saved = json.load(f)
  assert list(saved["runs"]) == ["sgd", "adam", "eva"]
  assert set(saved["learning_rates"]) == {"sgd", "adam", "eva"}
  assert saved["appended"][0]["optimizers"] == ["adam"]
  assert saved["appended"][0]["provenance"]["git"]["commit"]
  assert saved["runs"]["adam"]["cosine_of"] == "update vs gradient"
  assert "| Adam |" in record["table"] and "0." in record["table"]


def test_lr_sweep_extends_the_grid_at_an_edge(monkeypatch):
  """The sweep's choice, with the training replaced by a known score:
  validation loss (log lr - log 0.9)^2, +inf (diverged) above 2."""
  calls = []

  def fake_train(task, name, lr, epochs, seed, **kw):
    calls.append((name, lr, kw["eval_sets"]["val"][0].shape[0]))
    diverged = lr > 2.0
    val = np.inf if diverged else (np.log(lr) - np.log(0.9)) ** 2
    return {"epochs": [{"val_loss": val, "train_loss": 1.0}],
            "diverged": diverged, "time_per_epoch_s": 0.0}

  monkeypatch.setattr(harness.training, "train", fake_train)
  task = _digits_task()
  out = harness.lr_sweep(task, ["sgd", "eva"], {"sgd": 0.1, "eva": 2.0},
                         epochs=1, subset=500, validation=200, seed=0)
  sgd, eva = out["optimizers"]["sgd"], out["optimizers"]["eva"]
  # 0.0333, 0.1, 0.3: best at the top edge -> 0.9, again -> 2.7 (twice at most).
  assert [r["learning_rate"] for r in sgd["results"]] == [0.0333, 0.1, 0.3,
                                                          0.9, 2.7]
  assert sgd["chosen"] == 0.9 and sgd["results"][-1]["diverged"]
  assert sgd["results"][-1]["val_loss"] == np.inf
  # 0.667, 2, 6: 0.667 is best and at the bottom edge -> 0.222; 0.667 stays best.
  assert [r["learning_rate"] for r in eva["results"]] == [0.222, 0.667, 2.0,
                                                          6.0]
  assert eva["chosen"] == 0.667
  assert {c[2] for c in calls} == {200}   # scored on the held-out slice
  with pytest.raises(ValueError, match="exceed"):
    harness.lr_sweep(task, ["sgd"], {"sgd": 0.1}, epochs=1,
                     subset=len(task.x_train), validation=1, seed=0)


def test_load_adjusted_times_by_hand():
  # Epoch 1 ran at a reference SGD step of 2 s, epoch 2 at 4 s (twice the
  # load); against a common reference of 2 s, epoch 2's 10 s count as 5 s.
  rec = {"epochs": [
      {"epoch": 1, "epoch_time_s": 6.0, "train_time_s": 6.0, "ref_step_s": 2.0,
       "test_loss": 0.5},
      {"epoch": 2, "epoch_time_s": 10.0, "train_time_s": 16.0,
       "ref_step_s": 4.0, "test_loss": 0.3}]}
  other = {"ref_step_s": 2.0, "epochs": []}
  assert harness.common_reference({"a": {**rec, "ref_step_s": 3.0},
                                   "b": other, "c": other}) == 2.0
  times = harness.adjusted_times(rec, 2.0)
  assert times == [6.0, 11.0]
  assert harness.time_to_reach(rec, 0.3) == 16.0
  assert harness.time_to_reach(rec, 0.3, times) == 11.0
  assert harness.time_to_reach(rec, 0.2, times) is None
  assert harness.adjusted_times(rec, None) == [6.0, 16.0]


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_cosine_survives_tiny_and_huge_values(scale):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = {"w": np.array([1.0, 2.0, 0.0]), "b": np.array([3.0])}
  b = {"w": np.array([1.0, 2.0, 0.1]), "b": np.array([3.0])}
  ref = 14.0 / np.sqrt(14.0 * 14.01)
  got = harness.cosine(jax.tree.map(lambda x: jnp.asarray(scale * x, jnp.float32), a),
                       jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), b))
  # The inputs rounded to float32 (1), divided by their max (1), three sums of
  # 4 products (5): on the inputs; then a product, a root and a division (3)
  # on the result.
  cos = lambda a, b: a @ b / np.sqrt((a @ a) * (b @ b))
  flat = lambda t: np.concatenate([t["w"], t["b"]])
  bound = (propagated_bound(cos, (flat(a), 1 + 1 + 5), (flat(b), 1 + 1 + 5))
           + float32_tol(1.0, 3) * abs(ref))
  assert abs(float(got) - ref) <= bound


@needs_fmnist
def test_autoencoder_script_smoke(tmp_path):
  import autoencoder  # pylint: disable=g-import-not-at-top
  record = autoencoder.main([
      "--optimizers", "sgd,eva", "--epochs", "1", "--train-subset", "2000",
      "--out", str(tmp_path), "--no-progress"])
  assert (tmp_path / "autoencoder.json").exists()
  assert (tmp_path / "autoencoder.png").exists()
  for run in record["runs"].values():
    assert run["steps_per_epoch"] == 2
    assert 0.0 < run["epochs"][-1]["test_loss"] < 0.5


@needs_fmnist
def test_eva_damping_script_smoke(tmp_path):
  import eva_damping  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "damping.json")
  record = eva_damping.main(["runs", "--damping", "0.03,1e-3", "--epochs", "1",
                             "--train-subset", "3000", "--out", out])
  with open(out) as f:
    saved = json.load(f)
  assert set(saved["damping_runs"]) == {"damping 0.03, lr 0.18, 3000 images",
                                        "damping 0.001, lr 0.18, 3000 images"}
  assert saved["provenance"]["git"]["commit"]
  for run in record["damping_runs"].values():
    assert np.isfinite(run["final_test_loss"]) and len(run["test_loss"]) == 1
    # Curvature negligible at these dampings: the KL-normalized gradient.
    assert run["cosine_mean"] > 0.999


# ----------------------------------------------------------------------------
# The benchmark's library (benchmarks/benchlib).


def _benchlib():
  bench = os.path.join(ROOT, "benchmarks")
  if bench not in sys.path:
    sys.path.insert(0, bench)
  import benchlib.diagnostics  # pylint: disable=g-import-not-at-top
  import benchlib.timing  # pylint: disable=g-import-not-at-top
  return benchlib


def test_benchmark_layer_dims_by_hand():
  benchlib = _benchlib()
  z = np.zeros
  params = {"Conv_0": {"kernel": z((3, 3, 1, 8)), "bias": z(8)},
            "Dense_0": {"kernel": z((392, 10))},          # no bias
            "LayerNorm_0": {"scale": z(10), "bias": z(10)},
            "Block": {"DenseGeneral_0": {"kernel": z((10, 2, 3)),
                                         "bias": z((2, 3))}}}
  assert benchlib.diagnostics.layer_dims(params) == [
      ("Conv_0", 9, 8, True), ("Dense_0", 392, 10, False),
      ("Block/DenseGeneral_0", 10, 6, True)]
  state = {"count": np.zeros((), np.int32), "mu": z((4, 5), np.float32),
           "n": np.zeros((2,), np.int64)}
  assert benchlib.timing.integer_numbers(state) == 3


def test_benchmark_hang_timeout_exits_with_stacks():
  code = ("import sys, time; sys.path.insert(0, 'benchmarks');"
          "from benchlib import timing; timing.set_hang_timeout(1);"
          "timing.Runner('sleeper', lambda: time.sleep(30)).window(1)")
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120,
                       capture_output=True, text=True)
  assert out.returncode == 1
  assert "Timeout (0:00:01)!" in out.stderr and "window" in out.stderr


@pytest.mark.parametrize("script", ["autoencoder.py", "classifier.py",
                                    "eva_damping.py"])
def test_one_openblas_thread_before_numpy_loads(script):
  # OpenBLAS's Cholesky and eigh give other bits with other thread counts, so
  # a script run directly must pin the count before numpy (and scipy) load.
  with open(os.path.join(EXAMPLES, script)) as f:
    lines = f.read().splitlines()
  pin = lines.index('os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")')
  first_import = min(i for i, l in enumerate(lines)
                     if l.startswith(("import numpy", "import jax", "import flax",
                                      "import optax", "import datasets",
                                      "import harness", "import autoencoder")))
  assert pin < first_import
