"""Private implementation of eva_optax, grouped by concept (imports run downward only).

* ``vocabulary/``: what a layer is to the library (views, statistics, trees);
* ``linalg/``: closed forms and dense linear algebra;
* ``capture/``: gradients plus per-layer statistics from Flax models (uses vocabulary);
* ``preconditioner/``: the layer-wise and per-tensor cores and their machinery
  (uses vocabulary and linalg);
* ``optimizers/``: one file per method, its math (uses preconditioner and linalg);
* ``wrappers/``: the adaptive step, MultiSteps and TrainState (use the above).
"""
