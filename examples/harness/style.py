"""One colour and one marker per optimizer, for every figure of the project.

A figure that draws optimizer ``name`` passes ``**style.of(name)`` to
``ax.plot``::

    from harness import style               # examples/: `import harness` works
    ax.plot(epochs, losses, label="Eva-f", **style.of("eva_f"))
    ax.plot(epochs, losses, label="Eva-f + adaptive",
            **style.of("eva_f+adaptive"))   # Eva-f's colour, dashed
    style.integer_ticks(ax.xaxis)           # epochs 1, 2, 3 (never 1.5)
    style.target_line(ax, sgd_final_loss)   # SGD's final loss, dotted grey

(From ``benchmarks/``, put ``examples/`` on ``sys.path`` first: see
:mod:`harness.provenance`.)

Base names are the keys of :data:`COLORS`. A variant is named
``"<base>+<variant>"`` (``"eva_f+adaptive"``, ``"kfac+adaptive"``) or has an
entry in :data:`ALIASES` (``"kfac-jax"``, drawn as K-FAC): it takes its base's
colour and marker and the line style of :data:`VARIANT_LINESTYLES` (any other
variant is dash-dotted). Unknown names raise ``KeyError`` rather than silently
picking a colour another optimizer already wears: add them here.
"""

from __future__ import annotations

from typing import Any

# Matplotlib's tab10 colours, one per optimizer; Eva's family in blues and
# purple, the full-matrix methods in warm colours.
COLORS = {
    "sgd": "#7f7f7f",      # grey
    "adam": "#ff7f0e",     # orange
    "adamw": "#8c564b",    # brown
    "eva": "#1f77b4",      # blue
    "eva_f": "#17becf",    # cyan
    "eva_s": "#9467bd",    # purple
    "kfac": "#d62728",     # red
    "foof": "#e377c2",     # pink
    "shampoo": "#2ca02c",  # green
}
MARKERS = {"sgd": "o", "adam": "s", "adamw": "D", "eva": "^", "eva_f": "v",
           "eva_s": "<", "kfac": ">", "foof": "P", "shampoo": "X"}
# Other implementations of a base method: (base, variant).
ALIASES = {"kfac-jax": ("kfac", "kfac-jax")}
VARIANT_LINESTYLES = {None: "-", "adaptive": "--", "kfac-jax": ":", "split": "--"}
OTHER_VARIANT_LINESTYLE = "-."


def split(name: str) -> tuple[str, str | None]:
  """``"eva_f+adaptive"`` -> ``("eva_f", "adaptive")``; ``"eva"`` -> ``("eva", None)``."""
  if name in ALIASES:
    return ALIASES[name]
  base, _, variant = name.partition("+")
  if base not in COLORS:
    raise KeyError(f"No plot style for optimizer {name!r}; add its base to "
                   f"harness/style.py (known: {sorted(COLORS)}).")
  return base, variant or None


def of(name: str) -> dict[str, Any]:
  """``color``, ``marker`` and ``linestyle`` of optimizer ``name``."""
  base, variant = split(name)
  return {"color": COLORS[base], "marker": MARKERS[base],
          "linestyle": VARIANT_LINESTYLES.get(variant, OTHER_VARIANT_LINESTYLE)}


def integer_ticks(axis) -> None:
  """Integer-only major ticks on a matplotlib ``axis`` (e.g. ``ax.xaxis``)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(ticker.MaxNLocator(integer=True))


def target_line(ax, value: float, label: str = "SGD's final loss") -> None:
  """A horizontal dotted line at ``value`` in SGD's colour: the loss to reach."""
  ax.axhline(value, color=COLORS["sgd"], linestyle=":", linewidth=1.0,
             label=label)
