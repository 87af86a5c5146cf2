"""The optimizers, one file per method, each with its math: Eva, Eva-f, Eva-s,
K-FAC, FOOF and Shampoo."""
