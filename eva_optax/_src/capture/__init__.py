"""The capture: gradients plus per-layer statistics from unmodified Flax models
(linen through intercepted methods, NNX through wrapped layer methods)."""
