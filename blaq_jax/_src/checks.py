"""Argument checks shared by the public functions: one-line errors naming the argument.

Every check runs on the value as it enters a public function. Concrete
values (Python and numpy numbers, and the value of a schedule at step 0) are
checked for type, finiteness and range. A ``jax.Array`` is only checked for
being a scalar of a numeric dtype: under ``optax.inject_hyperparams`` the
hyperparameters are such arrays, often traced inside ``jit``, and reading
their value would need a host sync (or fail on a tracer), so their range is
not checked; a bad traced value shows up as a skipped step (LAQ/BLAQ count
steps whose result is not finite) or in the loss.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete_number(x, *, integer: bool = False) -> bool:
  """A Python or numpy real number (an integer if ``integer``): not a bool,
  not an array. Range checks run on these only (see the module docstring)."""
  kind = numbers.Integral if integer else numbers.Real
  return isinstance(x, kind) and not isinstance(x, (bool, np.bool_))


def is_traced(*xs) -> bool:
  """Whether any of ``xs`` is a tracer (its values cannot be read)."""
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def is_array_scalar(x) -> bool:
  """A scalar ``jax.Array`` or numpy array of a numeric dtype (a hyperparameter
  of ``optax.inject_hyperparams``, perhaps traced)."""
  return (isinstance(x, (jax.Array, np.ndarray)) and jnp.ndim(x) == 0
          and jnp.issubdtype(x.dtype, jnp.number))


def is_number(x) -> bool:
  """A concrete number or a numeric scalar array."""
  return is_concrete_number(x) or is_array_scalar(x)


def grad_fn(where: str, value, *, required: bool) -> None:
  """``grad_fn``: a function params -> gradient; None passes unless ``required``."""
  example = "e.g. grad_fn=lambda p: jax.grad(loss)(p, batch)"
  if value is None and required:
    raise ValueError(f"{where}: the keyword argument grad_fn is required: a function params "
                     f"-> gradient of the loss on the current batch, {example}")
  if value is not None and not callable(value):
    optional = "" if required else ", or None for a step without the lookahead"
    raise TypeError(f"{where}: grad_fn must be a function params -> gradient of the loss on "
                    f"the current batch, {example}{optional}; got {type(value).__name__}")


def require_params(where: str, params) -> None:
  """The one error of an ``update`` that needs ``params`` and got None."""
  if params is None:
    raise ValueError(f"{where}: params are required; call update(updates, state, params)")


def _range_text(lo, hi, lo_open, hi_open) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo}"
  if lo is None:
    return f"{'<' if hi_open else '<='} {hi}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(where: str, name: str, value, *, lo=None, hi=None, lo_open: bool = False,
           hi_open: bool = False, none_ok: bool = False, integer: bool = False) -> None:
  """Checks a numeric hyperparameter; raises a one-line TypeError/ValueError.

  ``value`` must be a real number (a bool or a string is refused), finite,
  and in the range given by ``lo``/``hi`` (open ends with ``lo_open`` /
  ``hi_open``); an int if ``integer``. None passes if ``none_ok``. A scalar
  ``jax.Array`` (a hyperparameter of ``optax.inject_hyperparams``) passes
  without a range check (see the module docstring).
  """
  allowed = _range_text(lo, hi, lo_open, hi_open) if (lo, hi) != (None, None) else ""
  kind = "an int" if integer else "a number"
  what = f"{kind} {allowed}".strip() + (" or None" if none_ok else "")
  if value is None and none_ok:
    return
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]   # a numpy scalar array is concrete: check its value
  if not integer and is_array_scalar(value):
    return
  if not is_concrete_number(value, integer=integer):
    raise TypeError(f"{where}: {name} must be {what}, got {value!r}")
  if not math.isfinite(float(value)):
    raise ValueError(f"{where}: {name} must be finite ({what}), got {value!r}")
  ok = ((lo is None or (value > lo if lo_open else value >= lo))
        and (hi is None or (value < hi if hi_open else value <= hi)))
  if not ok:
    raise ValueError(f"{where}: {name} must be {allowed}{' or None' if none_ok else ''}, "
                     f"got {value!r}")


def boolean(where: str, name: str, value) -> None:
  """Refuses anything but a bool (``per_channel='yes'`` is a TypeError)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{where}: {name} must be True or False, got {value!r}")


def _value_at_zero(schedule):
  """``schedule(0)`` as a float, or None where it is traced (no host sync)."""
  value = schedule(jnp.zeros([], jnp.int32))
  if is_traced(value):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return value


def scalar_or_schedule(where: str, name: str, value, *, lo=0.0, lo_open: bool = False,
                       hi=None) -> None:
  """Checks a float-or-schedule argument (a learning rate, a threshold, a weight).

  A number must be finite and in range (``>= lo`` by default: a learning
  rate of 0 freezes training, a negative one ascends the loss); a callable
  is evaluated at step 0 and its value checked the same way (a traced value
  is not). A scalar ``jax.Array`` passes unchecked (see the module docstring).
  """
  if callable(value):
    at0 = _value_at_zero(value)
    if at0 is None:
      return
    if not is_concrete_number(at0):
      raise TypeError(f"{where}: {name}(0) must be a number, got {at0!r}")
    if not math.isfinite(at0) or not (at0 > lo if lo_open else at0 >= lo) or (
        hi is not None and at0 > hi):
      raise ValueError(f"{where}: {name} is a schedule whose value at step 0 is {at0}; it "
                       f"must be finite and {_range_text(lo, hi, lo_open, False)}")
    return
  if not is_number(value):
    raise TypeError(f"{where}: {name} must be a number or a schedule (a function of the "
                    f"step count), got {value!r}")
  number(where, name, value, lo=lo, lo_open=lo_open, hi=hi)


def learning_rate(where: str, value) -> None:
  """A learning rate: a finite number >= 0, or a schedule whose value at 0 is one."""
  scalar_or_schedule(where, "learning_rate", value, lo=0.0)


def adam(where: str, b1, b2, eps, clip: float | None) -> None:
  """Adam's constants and the clip of the latent weights."""
  number(where, "b1", b1, lo=0, hi=1, hi_open=True)
  number(where, "b2", b2, lo=0, hi=1, hi_open=True)
  number(where, "eps", eps, lo=0)
  number(where, "clip", clip, lo=0, lo_open=True, none_ok=True)


def positive_finite(where: str, name: str, value) -> None:
  """A concrete array (not traced) must be finite and > 0 everywhere."""
  if value is None or is_traced(value):
    return
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.number):
    raise TypeError(f"{where}: {name} must be a numeric array, got dtype {arr.dtype}")
  if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
    bad = "non-finite" if not np.all(np.isfinite(arr)) else "non-positive"
    raise ValueError(f"{where}: {name} has {bad} entries; the curvature D must be finite "
                     "and > 0 (e.g. blaq_jax.curvature(opt_state)), or None for D = 1")
