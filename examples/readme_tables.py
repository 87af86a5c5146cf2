"""Rewrites the result tables of the README and the guides from the committed JSON.

Each table sits between two marker comments in the page that shows it (the
README for the headline table, ``docs/results.md`` and the other guides for the
rest)::

    <!-- table:demo -->
    ...generated, do not edit by hand...
    <!-- /table:demo -->

and is rendered from one JSON file by the entry of the same name in
:data:`TABLES`, whose ``pages`` name the Markdown files that hold it.
``python examples/readme_tables.py`` rewrites every table in place;
``--check`` rewrites nothing and exits with status 1 (and a diff) if a page
differs from what the JSON gives (``tests/test_results.py`` runs it).

To add a table, register one entry and put the two markers in its page::

    register(Table("scaling", "benchmarks/results/scaling.json", render_scaling,
                   pages=("docs/devices.md",)))

where ``render_scaling(record) -> str`` returns the markdown (table and any
notes). :func:`comparison_table` renders the examples' comparison records;
:func:`provenance_line` says which commit, command and versions produced a
record (old records without provenance say so, and name the commit that
added the file when the entry gives it).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchlib import ttq_report
from harness import optimizers
from harness import provenance
from harness import records
from harness import tables
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_PAGE = "docs/results.md"


@dataclasses.dataclass(frozen=True)
class Table:
  """One generated table: its marker name, its JSON (relative to the
  repository root), how to render it and the pages that show it.

  ``pages`` are Markdown files relative to the repository root; each holds the
  table's markers exactly once. ``committed_in`` names the commit that added a
  JSON written before records carried their provenance (shown in place of the
  unknown producing commit). ``missing``: the text shown between the markers
  while the JSON does not exist yet (a record still to be made); None: the
  JSON must exist.
  """

  name: str
  source: str
  render: Callable[[dict[str, Any]], str]
  committed_in: str | None = None
  pages: tuple[str, ...] = (RESULTS_PAGE,)
  missing: str | None = None


TABLES: dict[str, Table] = {}


def register(table: Table) -> Table:
  """Adds ``table`` to :data:`TABLES` (replacing one of the same name)."""
  TABLES[table.name] = table
  return table


def provenance_line(record: dict[str, Any],
                    committed_in: str | None = None) -> str:
  """One sentence: the commit (and whether the tree was dirty), the command,
  the date, eva_optax's and jax's versions, the device."""
  s = provenance.summary(record)
  v, d = s["versions"], s["device"]
  env = (f"eva_optax {v.get('eva_optax', '?')}, jax {v.get('jax', '?')}, "
         f"{d.get('platform', '?')} ({d.get('cpu_count', '?')} CPUs)")
  date = (s["date"] or "?")[:10]
  if s["commit"]:
    dirty = " with uncommitted changes" if s["dirty"] else ""
    return (f"Produced by commit `{s['commit'][:7]}`{dirty}: "
            f"`{s['command']}`, {date}, {env}.")
  where = (f" (this file was committed in `{committed_in}`)"
           if committed_in else "")
  return (f"Produced {date}, {env}; this record predates provenance records, "
          f"so the commit that produced it is not known{where}.")


def comparison_table(learning_rates: bool = True,
                     highlight: str = "eva") -> Callable[[dict[str, Any]], str]:
  """A renderer of an examples comparison record (``harness.run_comparison``).

  Columns: optimizer, learning rate (if ``learning_rates``), final test loss,
  test accuracy (where recorded), time per epoch, time to SGD's final test
  loss, the epoch that reaches it, state size, mean cosine. The
  ``highlight`` optimizer's name and loss are in bold.
  """
  def render(record: dict[str, Any]) -> str:
    runs = record["runs"]
    has_acc = any("test_accuracy" in e for r in runs.values()
                  for e in r["epochs"])
    target = tables.final_loss(runs.get("sgd"))
    head = ["optimizer"] + (["lr"] if learning_rates else []) + [
        "final test loss"] + (["test acc."] if has_acc else []) + [
            "time/epoch (s)", "time to SGD's final loss (s)",
            "epoch reaching it", "state (MB)", "cosine"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for name, rec in runs.items():
      last = rec["epochs"][-1] if rec["epochs"] else {}
      loss = last.get("test_loss")
      label = optimizers.LABELS.get(name, rec.get("label", name))
      loss_s = ("diverged" if rec["diverged"] else
                "-" if loss is None else f"{loss:.5f}")
      if name == highlight:
        label, loss_s = f"**{label}**", f"**{loss_s}**"
      row = [label]
      if learning_rates:
        row.append(f"{rec['hyperparameters']['learning_rate']:g}")
      row.append(loss_s)
      if has_acc:
        acc = last.get("test_accuracy")
        row.append("-" if acc is None else f"{100 * acc:.2f}%")
      row.append(f"{rec['time_per_epoch_s']:.1f}")
      if target is None:
        row += ["-", "-"]
      else:
        t = tables.time_to_reach(rec, target)
        e = tables.time_to_reach(rec, target, [x["epoch"] for x in rec["epochs"]])
        row += ["not reached" if t is None else f"{t:.1f}",
                "not reached" if e is None else f"{e:d}"]
      row.append(f"{rec['state_bytes'] / 2**20:.2f}")
      cos = rec.get("cosine_mean")
      row.append("-" if name == "sgd" or cos is None else f"{cos:.3f}" + (
          "" if rec["cosine_of"].startswith("precond") else "*"))
      lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
  return render


register(Table("demo", "examples/results/demo.json",
               comparison_table(learning_rates=False)))
# The headline: the README shows it, and the results guide with the others.
register(Table("autoencoder", "examples/results/autoencoder.json",
               comparison_table(), committed_in="444f82d",
               pages=("README.md", RESULTS_PAGE)))
register(Table("classifier", "examples/results/classifier.json",
               comparison_table(), committed_in="444f82d"))
register(Table("classifier_next_lower_lr",
               "examples/results/classifier_next_lower_lr.json",
               comparison_table(), committed_in="863507a"))
register(Table("transformer_lm", "examples/results/transformer_lm.json",
               comparison_table()))
# benchmarks/time_to_quality.py's tables: benchlib.ttq_report.markdown_table, a
# pure function of the record (its JSON also stores it), which renders older
# records too (the cost column is computed from their evaluations).
register(Table("time_to_quality", "benchmarks/results/time_to_quality.json",
               ttq_report.markdown_table))
register(Table(
    "time_to_quality_transformer",
    "benchmarks/results/time_to_quality_transformer.json",
    ttq_report.markdown_table,
    missing=("No record yet: `python benchmarks/time_to_quality.py --task "
             "transformer` writes `benchmarks/results/"
             "time_to_quality_transformer.json`, and `python "
             "examples/readme_tables.py` puts its table here.")))
# benchmarks/scaling.py's tables are rendered from its record's summary by
# benchlib.scaling_report.markdown (a record of the earlier, one-table benchmark
# renders the table stored in it).
def render_scaling(record: dict[str, Any]) -> str:
  bench = os.path.join(ROOT, "benchmarks")
  if bench not in sys.path:
    sys.path.insert(0, bench)
  from benchlib import scaling_report  # pylint: disable=g-import-not-at-top
  return scaling_report.markdown(record)


register(Table("scaling", "benchmarks/results/scaling.json", render_scaling,
               pages=("docs/devices.md",)))


def render(table: Table, root: str = ROOT) -> str:
  """The markdown between ``table``'s markers: the table and its provenance
  (``table.missing`` while an optional JSON does not exist)."""
  path = os.path.join(root, table.source)
  if table.missing is not None and not os.path.isfile(path):
    return table.missing
  record = records.read_json(path)
  return (table.render(record).rstrip("\n") + "\n\n"
          + provenance_line(record, table.committed_in))


def _block(name: str) -> re.Pattern[str]:
  return re.compile(rf"(<!-- table:{re.escape(name)} -->\n)(.*?)"
                    rf"(<!-- /table:{re.escape(name)} -->)", re.DOTALL)


def rewrite(text: str, root: str = ROOT,
            names: list[str] | None = None, page: str = "the page") -> str:
  """``text`` (one page) with the tables ``names`` (default: all) regenerated.

  Raises:
    ValueError: one of the tables has no (or more than one) marker pair.
  """
  for name in names or list(TABLES):
    pattern = _block(name)
    found = len(pattern.findall(text))
    if found != 1:
      raise ValueError(
          f"{page} has {found} '<!-- table:{name} -->' ... "
          f"'<!-- /table:{name} -->' blocks; put exactly one around the "
          "table.")
    body = render(TABLES[name], root)
    text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
  return text


def pages(names: list[str]) -> dict[str, list[str]]:
  """``{page: [its tables among names]}``, pages in registration order."""
  out: dict[str, list[str]] = {}
  for name in names:
    for page in TABLES[name].pages:
      out.setdefault(page, []).append(name)
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--check", action="store_true",
                 help="change nothing; exit 1 and print a diff if a page "
                 "differs from the JSON")
  p.add_argument("--pages-root", default=ROOT,
                 help="the directory the pages (README.md, docs/*.md) are "
                 "read from and written to; the JSON is always this "
                 "checkout's")
  p.add_argument("--tables", default=",".join(TABLES),
                 help="comma-separated tables to regenerate")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  names = [n.strip() for n in args.tables.split(",") if n.strip()]
  unknown = [n for n in names if n not in TABLES]
  if unknown:
    raise SystemExit(f"unknown table(s) {unknown}; registered: {list(TABLES)}")
  stale = []
  for page, page_names in pages(names).items():
    path = os.path.join(args.pages_root, page)
    with open(path) as f:
      old = f.read()
    new = rewrite(old, names=page_names, page=page)
    if new == old:
      print(f"{page}: {len(page_names)} tables match their JSON.")
    elif args.check:
      stale.append(page)
      sys.stdout.writelines(difflib.unified_diff(
          old.splitlines(True), new.splitlines(True), f"{page} (committed)",
          f"{page} (from the JSON)"))
    else:
      with open(path, "w") as f:
        f.write(new)
      print(f"{page}: {len(page_names)} tables rewritten.")
  if stale:
    print(f"\nThe tables of {', '.join(stale)} differ from the JSON: run "
          "`python examples/readme_tables.py`.")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
