"""Closed forms and dense linear algebra: the numerics under every preconditioner."""
