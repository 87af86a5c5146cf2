"""Results that reproduce: the README's tables come from the committed JSON,
every record says where it came from, and the figures keep one style."""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)

import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import readme_tables  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(EXAMPLES, "results")


def _comparisons() -> dict[str, dict]:
  out = {}
  for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if "runs" in record:
      out[os.path.basename(path)] = record
  return out


def _run(epochs_losses, label, **extra):
  """A run record with the given per-epoch test losses (1 s per epoch)."""
  epochs = [{"epoch": i + 1, "epoch_time_s": 1.0, "train_time_s": i + 1.0,
             "test_loss": v} for i, v in enumerate(epochs_losses)]
  rec = {"label": label, "epochs": epochs, "diverged": False,
         "time_per_epoch_s": 1.0, "state_bytes": 2**20, "cosine_mean": 0.5,
         "cosine_of": "preconditioned gradient (before momentum) vs gradient",
         "hyperparameters": {"learning_rate": 0.1}, "train_examples": 100,
         "batch_size": 10}
  rec.update(extra)
  return rec


# ----------------------------------------------------------------------------
# The generated tables of the README and the guides.

# Every Markdown page that may hold a generated table.
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(page: str, root: str = ROOT) -> str:
  with open(os.path.join(root, page)) as f:
    return f.read()


def test_readme_tables_match_the_json(capsys):
  assert readme_tables.main(["--check"]) == 0, capsys.readouterr().out


def test_every_registered_table_has_its_markers_and_json():
  for name, table in readme_tables.TABLES.items():
    assert table.pages, name
    for page in table.pages:
      text = _read(page)
      assert text.count(f"<!-- table:{name} -->") == 1, (name, page)
      assert text.count(f"<!-- /table:{name} -->") == 1, (name, page)
    assert os.path.isfile(os.path.join(ROOT, table.source)), table.source


def test_no_page_holds_a_table_it_is_not_registered_for():
  """A table moved to another page leaves no stale copy behind."""
  for page in PAGES:
    for name in re.findall(r"^<!-- table:(\w+) -->$", _read(page), re.M):
      assert name in readme_tables.TABLES, f"{page}: unregistered table {name}"
      assert page in readme_tables.TABLES[name].pages, (
          f"{page} holds table {name}, registered for {readme_tables.TABLES[name].pages}")


def test_check_fails_on_a_stale_table_and_rewrite_fixes_it(tmp_path, capsys):
  pages = sorted({p for t in readme_tables.TABLES.values() for p in t.pages})
  for page in pages:
    os.makedirs(tmp_path / os.path.dirname(page), exist_ok=True)
    (tmp_path / page).write_text(_read(page))
  [demo_page] = readme_tables.TABLES["demo"].pages
  text = _read(demo_page)
  demo = readme_tables.render(readme_tables.TABLES["demo"])
  sgd_row = next(line for line in demo.splitlines() if line.startswith("| SGD"))
  stale = text.replace(sgd_row, sgd_row.replace("| SGD |", "| SGD (old) |"), 1)
  assert stale != text
  (tmp_path / demo_page).write_text(stale)
  assert readme_tables.main(["--check", "--pages-root", str(tmp_path)]) == 1
  out = capsys.readouterr().out
  assert "SGD (old)" in out and demo_page in out
  assert readme_tables.main(["--pages-root", str(tmp_path)]) == 0
  assert (tmp_path / demo_page).read_text() == text
  for page in pages:
    assert (tmp_path / page).read_text() == _read(page), page


def test_missing_markers_say_how_to_fix():
  with pytest.raises(ValueError, match="table:demo"):
    readme_tables.rewrite("no markers here", names=["demo"])


def test_comparison_table_by_hand():
  record = {"runs": {
      "sgd": _run([0.5, 0.3], "SGD"),
      "eva": _run([0.3, 0.2], "Eva", cosine_mean=1.0),
      "adam": _run([0.6, 0.35], "Adam", cosine_of="update vs gradient",
                   cosine_mean=0.25),
  }}
  got = readme_tables.comparison_table()(record)
  assert got.splitlines() == [
      "| optimizer | lr | final test loss | time/epoch (s) | time to SGD's "
      "final loss (s) | epoch reaching it | state (MB) | cosine |",
      "|---|---|---|---|---|---|---|---|",
      "| SGD | 0.1 | 0.30000 | 1.0 | 2.0 | 2 | 1.00 | - |",
      "| **Eva** | 0.1 | **0.20000** | 1.0 | 1.0 | 1 | 1.00 | 1.000 |",
      "| Adam | 0.1 | 0.35000 | 1.0 | not reached | not reached | 1.00 | "
      "0.250* |",
  ]


def test_provenance_line_old_and_new():
  old = {"versions": {"eva_optax": "0.1.0", "jax": "0.10.2"},
         "device": {"platform": "cpu", "cpu_count": 2},
         "runs": {"sgd": {"finished_at": "2026-11-27 11:04:53"}}}
  line = readme_tables.provenance_line(old, "444f82d")
  assert "2026-11-27" in line and "not known" in line and "`444f82d`" in line
  assert "eva_optax 0.1.0, jax 0.10.2, cpu (2 CPUs)" in line
  new = {"provenance": {
      "git": {"commit": "0123456789abcdef", "dirty": True},
      "command": "python examples/demo.py", "date": "2026-12-02T11:00:00+00:00",
      "versions": {"eva_optax": "0.1.0", "jax": "0.10.2"},
      "device": {"platform": "cpu", "cpu_count": 2}}}
  line = readme_tables.provenance_line(new)
  assert line.startswith("Produced by commit `0123456` with uncommitted changes")
  assert "`python examples/demo.py`, 2026-12-02" in line


# ----------------------------------------------------------------------------
# Provenance.


def test_provenance_names_this_checkout():
  p = harness.provenance.collect(["examples/demo.py", "--epochs", "2"])
  assert p["command"] == "python examples/demo.py --epochs 2"
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=True).stdout
  assert p["git"]["commit"] == head.strip()
  assert isinstance(p["git"]["dirty"], bool)
  status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"],
                          capture_output=True, text=True, check=True).stdout
  assert p["git"]["dirty"] == bool(status.strip())
  assert p["git"]["dirty"] == bool(p["git"]["dirty_files"]
                                   or p["git"]["untracked_files"])
  v = p["versions"]
  assert v["jax"] == jax.__version__
  assert v["jaxlib"] == importlib.metadata.version("jaxlib")
  for name in ("flax", "optax", "numpy"):
    assert v[name] == importlib.metadata.version(name)
  assert v["eva_optax"] == __import__("eva_optax").__version__
  assert p["device"]["kind"] == jax.devices()[0].device_kind
  date = datetime.datetime.fromisoformat(p["date"])
  now = datetime.datetime.now(datetime.timezone.utc)
  assert abs((now - date).total_seconds()) < 600
  json.dumps(p)  # JSON-ready


def test_provenance_outside_git(monkeypatch, tmp_path):
  monkeypatch.setattr(harness.provenance, "REPO", str(tmp_path))
  state = harness.provenance.git_state()
  assert state["commit"] is None and state["dirty"] is None


def test_committed_records_carry_versions():
  for name, record in _comparisons().items():
    s = harness.provenance.summary(record)
    assert s["versions"].get("eva_optax") and s["versions"].get("jax"), name
    assert s["date"], name


# ----------------------------------------------------------------------------
# Figures.


def test_style_one_colour_and_marker_per_optimizer():
  style = harness.style
  bases = list(style.COLORS)
  assert set(harness.OPTIMIZERS) <= set(bases)
  assert len({style.of(n)["color"] for n in bases}) == len(bases)
  assert len({style.of(n)["marker"] for n in bases}) == len(bases)
  for variant, base in (("eva_f+adaptive", "eva_f"), ("kfac+adaptive", "kfac"),
                        ("kfac-jax", "kfac"), ("eva+other", "eva")):
    v, b = style.of(variant), style.of(base)
    assert (v["color"], v["marker"]) == (b["color"], b["marker"])
    assert v["linestyle"] != b["linestyle"]
  with pytest.raises(KeyError, match="style.py"):
    style.of("lion")


def test_figure_titles_differ_between_committed_records():
  titles = [harness.plots.figure_title(r) for r in _comparisons().values()]
  assert len(titles) >= 4 and len(set(titles)) == len(titles)


def test_figure_style_by_hand():
  record = {"task": "autoencoder", "title": "A task",
            "config": {"epochs": 3, "seed": 0, "schedule": "linear"},
            "learning_rates": {"sgd": 0.5, "eva": 0.2},
            "runs": {"sgd": _run([0.5, 0.4, 0.3], "SGD"),
                     "eva": _run([0.45, 0.25, 0.2], "Eva")}}
  fig = harness.plots.figure(record)
  ax = fig.axes[0]
  assert ax.get_ylabel() == "test MSE (mean over batch x 784 pixels)"
  ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
  assert ticks and all(float(t).is_integer() for t in ticks)
  lines = {l.get_label(): l for l in ax.get_lines()}
  for name, label in (("sgd", "SGD"), ("eva", "Eva")):
    assert lines[label].get_color() == harness.style.of(name)["color"]
    assert lines[label].get_marker() == harness.style.of(name)["marker"]
  (target,) = [l for l in lines.values() if l.get_label().startswith("SGD's")]
  assert np.allclose(target.get_ydata(), 0.3)
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert title.startswith("A task\n3 epochs on 100 training examples, batch 10")
  assert "lr: SGD 0.5, Eva 0.2" in title


# ----------------------------------------------------------------------------
# Memory of a compiled step.


def test_memory_figures_of_a_known_step():
  f = jax.jit(lambda a, b: (a @ b, a + 1.0), donate_argnums=(0,))
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  m = harness.memory.memory_figures(f.lower(a, b).compile())
  assert m["argument"] == 4 * (64 * 32 + 32 * 16)
  assert m["output"] >= 4 * (64 * 16 + 64 * 32)
  assert m["alias"] in (0, 4 * 64 * 32)   # a + 1 may reuse the donated a
  assert m["peak"] > 0
