"""blaq_jax: training neural networks with 1- to 8-bit weights in JAX/Optax."""

from blaq_jax._src.blaq import BLAQState
from blaq_jax._src.blaq import blaq
from blaq_jax._src.laq import LAQState
from blaq_jax._src.laq import laq
from blaq_jax._src.parallel import DataParallel
from blaq_jax._src.parallel import data_parallel
from blaq_jax._src.quantizers import QuantSpec
from blaq_jax._src.quantizers import quantize
from blaq_jax._src.spec import quant_spec
from blaq_jax._src.spec import quantize_params
from blaq_jax._src.state import curvature

__version__ = "0.1.0"

__all__ = (
    "BLAQState",
    "DataParallel",
    "LAQState",
    "QuantSpec",
    "blaq",
    "curvature",
    "data_parallel",
    "laq",
    "quant_spec",
    "quantize",
    "quantize_params",
)
