"""The preconditioner cores (layer-wise and per-tensor) and the machinery they
share: pairing layers with statistics and state, counters and the safe step,
hyperparameter checks, the KL scalings, grafting and the training chain."""
