"""benchmarks/time_to_quality.py: reach and cost by hand, the committed record's
table, the load check, the per-row settings, and smoke runs of the transformer
task and of the exploration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for d in ("benchmarks", "examples"):
  if os.path.join(ROOT, d) not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, d))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchlib import loadavg
from benchlib import ttq_cli
from benchlib import ttq_report
from benchlib import ttq_rows
from harness import records
# pylint: enable=g-import-not-at-top,wrong-import-position



def _run(row, losses, ratio, initial=None, key="val_loss"):
  rec = {"row": row, "learning_rate": None if "+" in row else 0.1,
         "evals": [{"epoch": 0.5 * (i + 1), key: v, "train_seconds": 10.0 * (i + 1)}
                   for i, v in enumerate(losses)],
         "train_seconds": 10.0 * len(losses), "step_ratio_vs_sgd": ratio}
  if initial is not None:
    rec["initial_loss"] = initial
  return rec


def _record(runs, key="val_loss"):
  return {"runs": runs, "config": {"epochs": 2},
          "metric": {"key": key, "label": "validation loss (nats)"},
          "labels": {"adam": "AdamW"}, "targets": {}}


def test_reach_interpolates_between_evaluations():
  rec = _run("eva_f", [3.0, 2.0, 1.5, 1.0], 1.0, initial=4.0)
  r = ttq_report.reach(rec, 1.75, "val_loss")
  assert r["epoch"] == 1.5 and r["epoch_interp"] == pytest.approx(1.25)
  assert not r["bound"]
  # Below at the first evaluation: from the initial loss at epoch 0.
  r = ttq_report.reach(rec, 3.5, "val_loss")
  assert r["epoch_interp"] == pytest.approx(0.25) and not r["bound"]
  # No initial loss (an old record): the first evaluation, an upper bound.
  del rec["initial_loss"]
  r = ttq_report.reach(rec, 3.5, "val_loss")
  assert r["epoch_interp"] == 0.5 and r["bound"]
  assert ttq_report.reach(rec, 0.5, "val_loss") is None
  rec["initial_loss"] = 4.0     # already there at epoch 0
  assert ttq_report.reach(rec, 4.5, "val_loss")["epoch_interp"] == 0.0


def test_cost_relative_to_the_baseline_by_hand():
  runs = {"adam": _run("adam", [3.0, 2.5, 2.2, 2.0], 1.0, initial=4.0),
          "kfac": _run("kfac", [2.6, 2.1, 1.9, 1.8], 2.0, initial=4.0),
          "sgd": _run("sgd", [3.5, 3.2, 3.1, 3.0], 1.0, initial=4.0)}
  record = _record(runs)
  # AdamW reaches its final 2.0 at epoch 2; K-FAC between 1.0 (2.1) and
  # 1.5 (1.9): epoch 1.25, at twice SGD's step: 2.5 / 2.
  c = ttq_report.cost(runs["kfac"], record)
  assert c["epochs"] == pytest.approx(1.25) and c["value"] == pytest.approx(1.25)
  assert ttq_report.cost(runs["sgd"], record) == {"value": None}
  assert ttq_report.cost(runs["adam"], record)["value"] == pytest.approx(1.0)
  table = ttq_report.markdown_table(record)
  head = table.splitlines()[0]
  assert "reaches AdamW's 2.000: epoch (s)" in head
  assert "cost to reach AdamW's 2.000, relative to AdamW's" in head
  assert "| K-FAC | 0.1 | 2.100 | 1.800 | 40 | 2.00x | 1.5 (30 s) | 1.25x |" in table
  assert "| SGD | 0.1 | 3.200 | 3.000 | 40 | 1.00x | not reached | not reached |" in table


def test_committed_autoencoder_record_gains_the_cost_column():
  record = records.read_json(os.path.join(
      ROOT, "benchmarks", "results", "time_to_quality.json"))
  table = ttq_report.markdown_table(record)
  assert "cost to reach Adam's 0.0219, relative to Adam's" in table
  rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()
          if line.startswith("| ")}
  assert rows["Adam"].endswith("| 1.00x |")
  assert rows["Eva"].endswith("| not reached |")
  # FOOF + adaptive is below Adam's final MSE at the first evaluation (epoch
  # 0.5): its cost, by hand from the record's losses, interpolated from the
  # initial loss at epoch 0, over Adam's 3 epochs.
  runs = record["runs"]
  target = runs["adam"]["evals"][-1]["test_mse"]
  foof = runs["foof+adaptive"]
  first = foof["evals"][0]
  assert first["epoch"] == 0.5 and first["test_mse"] <= target < foof["initial_loss"]
  epochs = 0.5 * (foof["initial_loss"] - target) / (foof["initial_loss"] - first["test_mse"])
  want = (epochs * foof["step_ratio_vs_sgd"]
          / (3.0 * runs["adam"]["step_ratio_vs_sgd"]))
  assert rows["FOOF + adaptive"].endswith(f"| {want:.2f}x |"), (rows["FOOF + adaptive"], want)


def test_when_quiet_retimes_under_load(monkeypatch):
  loads = iter([5.0, 5.0, 3.0, 3.0, 1.0, 1.5])
  monkeypatch.setattr(loadavg.os, "getloadavg",
                      lambda: (next(loads), 0.0, 0.0))
  calls = []
  result, rec = loadavg.when_quiet(lambda: calls.append(1) or len(calls),
                                   max_load=2.0, retries=3, max_wait=0,
                                   log=None)
  assert result == 3 and rec["quiet"] and rec["used"] == 2
  assert [a["load_before"][0] for a in rec["attempts"]] == [5.0, 3.0, 1.0]
  # Never quiet: the least loaded attempt is kept, and the record says so.
  loads = iter([9.0, 8.0, 4.0, 3.0])
  monkeypatch.setattr(loadavg.os, "getloadavg",
                      lambda: (next(loads), 0.0, 0.0))
  result, rec = loadavg.when_quiet(lambda: "timing", 2.0, 1, 0, log=None)
  assert not rec["quiet"] and rec["used"] == 1 and "least loaded" in rec["note"]


def test_per_row_settings():
  p = ttq_cli.parser("x")
  args = ttq_cli.parse_args(p, ["--curvature-batch", "250",
                                "--curvature-batch", "foof+adaptive=100",
                                "--adapt-every", "kfac+adaptive=20",
                                "--inverse-every", "50"], "out")

  class Task:
    batch, inverse_every = 1000, 10

  cfg = ttq_rows.config("foof+adaptive", args.settings, Task)
  assert (cfg.curvature_batch, cfg.adapt_every, cfg.inverse_every) == (100, 5, 50)
  assert cfg.stats_batch is None and cfg.stats_every == 1 and cfg.period == 50
  cfg = ttq_rows.config("kfac+adaptive", args.settings, Task)
  assert (cfg.curvature_batch, cfg.adapt_every, cfg.period) == (250, 20, 100)
  cfg = ttq_rows.config("eva", args.settings, Task)
  assert cfg.settings() == {"stats_batch": None, "stats_every": 1}
  assert ttq_rows.config("adam", args.settings, Task).settings() == {}
  with pytest.raises(SystemExit):
    ttq_cli.parse_args(p, ["--adapt-every", "eva=5"], "out")


def _smoke(tmp_path, *flags):
  # XLA_FLAGS: conftest put the fast-compile flags this jaxlib accepts there.
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.join(
      ROOT, "benchmarks", "time_to_quality.py"), "--quick", "--no-progress",
                        "--out", str(tmp_path), *flags],
                       env=env, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _kjv_installed() -> bool:
  import text_data  # pylint: disable=g-import-not-at-top
  return text_data.kjv_reader() is not None


@pytest.mark.skipif(not _kjv_installed(), reason="needs `make data` (bible-kjv)")
def test_transformer_quick(tmp_path):
  _smoke(tmp_path, "--task", "transformer",
         "--rows", "sgd,adam,gradient+adaptive")
  with open(tmp_path / "time_to_quality_transformer.json") as f:
    saved = json.load(f)
  assert saved["task"] == "transformer" and saved["metric"]["key"] == "val_loss"
  assert list(saved["runs"]) == ["sgd", "adam", "gradient+adaptive"]
  for run in saved["runs"].values():
    assert [e["epoch"] for e in run["evals"]] == [0.5, 1.0]
    assert all(0.0 < e["val_loss"] < 10.0 for e in run["evals"])
    assert run["step_ratio_vs_sgd"] > 0
    assert set(run["load_average"]) == {"before", "after"}
    assert len(run["step_ratio_timing"]["attempts"]) == 1   # --quick: no wait
  assert saved["runs"]["gradient+adaptive"]["adaptive"]["nonfinite_count"] == 0
  assert saved["config"]["adaptive_rows"]["loss"] == "softmax_cross_entropy"
  assert "cost to reach AdamW's" in saved["table"]
  assert saved["table"] == ttq_report.markdown_table(saved)
  assert os.path.getsize(tmp_path / "time_to_quality_transformer.png") > 1000


def test_explore_quick(tmp_path):
  stdout = _smoke(tmp_path, "--explore", "--explore-rows", "eva_f,foof+adaptive",
                  "--grid", "curvature_batch=all,500", "--grid", "adapt_every=5",
                  "--grid", "inverse_every=1", "--stats-batch", "500",
                  "--target", "0.209",
                  "--baseline-epochs", "1")
  with open(tmp_path / "time_to_quality_explore.json") as f:
    saved = json.load(f)
  shorts = [r["short"] for r in saved["runs"]]
  assert [r["row"] for r in saved["runs"]] == ["eva_f"] + ["foof+adaptive"] * 2
  assert shorts[0] == "stats_batch=500 stats_every=1"
  assert shorts[2] == ("stats_batch=500 curvature_batch=500 adapt_every=5 "
                       "inverse_every=1 stats_every=1")
  for r in saved["runs"]:
    assert r["step_ratio_vs_sgd"] > 0 and len(r["evals"]) == 2   # 2 steps
    assert (r["reach"] is None) == (r["cost_vs_baseline"] is None)
  assert saved["baseline"]["step_ratio_vs_sgd"] > 0
  assert saved["table"] in stdout
  assert os.path.getsize(tmp_path / "time_to_quality_explore.png") > 1000
