"""blaq_jax: training neural networks with 1- to 8-bit weights in JAX/Optax."""

import importlib.metadata as _metadata

from blaq_jax._src.activations import quantize_activation
from blaq_jax._src.activations import sign_activation
from blaq_jax._src.alpha_blending import alpha_blend_params
from blaq_jax._src.alpha_blending import alpha_blending_schedule
from blaq_jax._src.blaq import BLAQState
from blaq_jax._src.blaq import GradFn
from blaq_jax._src.blaq import blaq
from blaq_jax._src.blaq import periodic_lookahead
from blaq_jax._src.dampening import DampeningState
from blaq_jax._src.dampening import add_oscillation_dampening
from blaq_jax._src.diagnostics import OscillationState
from blaq_jax._src.diagnostics import oscillation_stats
from blaq_jax._src.diagnostics import track_oscillations
from blaq_jax._src.export import PackedModel
from blaq_jax._src.export import load_packed
from blaq_jax._src.export import load_packed_model
from blaq_jax._src.export import pack
from blaq_jax._src.export import save_packed
from blaq_jax._src.export import size_report
from blaq_jax._src.export import unpack
from blaq_jax._src.freezing import FreezingState
from blaq_jax._src.freezing import freeze_oscillations
from blaq_jax._src.laq import LAQState
from blaq_jax._src.laq import laq
from blaq_jax._src.packed import PackedArray
from blaq_jax._src.packed import dequantize
from blaq_jax._src.packed import dequantize_tree
from blaq_jax._src.packed import pack_params
from blaq_jax._src.parallel import DataParallel
from blaq_jax._src.parallel import data_parallel
from blaq_jax._src.quantize_params import quantize_params
from blaq_jax._src.quantizers import fit_scale
from blaq_jax._src.quantizers import quantize
from blaq_jax._src.quantizers import quantize_with_scale
from blaq_jax._src.quantizers import warm_fit_cost
from blaq_jax._src.qwix_export import to_qwix
from blaq_jax._src.sharding import shard_like
from blaq_jax._src.spec import QuantSpec
from blaq_jax._src.spec import QuantSpecTree
from blaq_jax._src.spec import quant_spec
from blaq_jax._src.state_lookup import curvature
from blaq_jax._src.ste import STEState
from blaq_jax._src.ste import ste
from blaq_jax._src.ste import ste_quantize
from blaq_jax._src.ste import ste_quantize_params

try:
  __version__ = _metadata.version("blaq_jax")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "0+unknown"

__all__ = (
    "BLAQState",
    "DampeningState",
    "DataParallel",
    "FreezingState",
    "GradFn",
    "LAQState",
    "OscillationState",
    "PackedArray",
    "PackedModel",
    "QuantSpec",
    "QuantSpecTree",
    "STEState",
    "add_oscillation_dampening",
    "alpha_blend_params",
    "alpha_blending_schedule",
    "blaq",
    "curvature",
    "data_parallel",
    "dequantize",
    "dequantize_tree",
    "fit_scale",
    "warm_fit_cost",
    "freeze_oscillations",
    "laq",
    "load_packed",
    "load_packed_model",
    "oscillation_stats",
    "pack",
    "pack_params",
    "periodic_lookahead",
    "quant_spec",
    "quantize",
    "quantize_activation",
    "quantize_params",
    "quantize_with_scale",
    "save_packed",
    "shard_like",
    "sign_activation",
    "size_report",
    "ste",
    "ste_quantize",
    "ste_quantize_params",
    "to_qwix",
    "track_oscillations",
    "unpack",
)
