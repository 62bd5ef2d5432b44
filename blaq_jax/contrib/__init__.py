"""Experimental variants of blaq_jax's optimizers.

Research code that keeps the library's docstring and test standard but whose
benefit is not established (see benchmarks/README.md); names here may change.
"""

from blaq_jax.contrib._cheap_lookahead import BLAQReuseState
from blaq_jax.contrib._cheap_lookahead import blaq_model
from blaq_jax.contrib._cheap_lookahead import blaq_reuse

__all__ = (
    "BLAQReuseState",
    "blaq_model",
    "blaq_reuse",
)
