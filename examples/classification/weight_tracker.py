"""Per-weight tracking for the BLAQ paper's Table 1 ("the same locked weight").

``config.track_weights = n`` follows ``n`` weights drawn uniformly (by
``config.seed``) from all quantized kernels. Each jitted step returns their
latent values ``w_t`` and the code indices of their quantized values ``ŵ_t``
(the weights that step's forward pass used; for ``fp`` the plain projection
of its weights); the host keeps the last ``config.track_last_epochs`` epochs.
Each metrics row then gives, over that window and per sampled weight, the
peak-to-peak range of the latent weight (``tw_amp_*``, max / median / mean
over the sample) and the number of changes of its code (``tw_flips_*``), and
``tw_top_flips`` / ``tw_top_amp`` for the sampled weight that flips most. The
sample is the same for every method at a given seed and model, so LAQ and
BLAQ rows describe the same weights; the traces are saved in
``tracked_weights.npz``. The code index is that of ``ŵ/α`` in the code book,
with ``α`` the largest ``|ŵ|`` of the weight's scale group, exact whenever
the group uses its top code (always at 1 bit); ``tw_grid_mismatch`` counts
sampled values off that grid (0 when exact).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

import blaq_jax as bq
from examples import checkpointing


class WeightTracker:
  """Follows ``n`` weights sampled (by ``seed``) from the quantized kernels.

  :meth:`gather` (inside the jitted step) returns their latent values and
  code indices; :meth:`add_epoch` (on the host) keeps the last
  ``window_epochs`` epochs of them and returns the Table 1 figures of that
  window; :meth:`save` writes the window's traces.
  """

  def __init__(self, params, spec, n: int, seed: int, window_epochs: int = 1):
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(spec, is_leaf=lambda x: x is None or isinstance(x, bq.QuantSpec))
    self.leaves = []          # (leaf index, path, spec, flat indices)
    self.window = collections.deque(maxlen=window_epochs)   # per epoch: (w, codes, off)
    cands = [(i, jax.tree_util.keystr(path, simple=True, separator="/"), s, np.size(w))
             for i, ((path, w), s) in enumerate(zip(flat_p, flat_s)) if s is not None]
    sizes = np.array([size for *_, size in cands], dtype=np.int64)
    total = int(sizes.sum())
    if n > 0 and total > 0:
      rng = np.random.default_rng([seed, 13])
      picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
      starts = np.concatenate([[0], np.cumsum(sizes)])
      for k, (i, path, s, _) in enumerate(cands):
        idx = picks[(picks >= starts[k]) & (picks < starts[k + 1])] - starts[k]
        if len(idx):
          self.leaves.append((i, path, s, idx.astype(np.int32)))
    self.size = sum(len(idx) for *_, idx in self.leaves)

  def paths(self) -> list[str]:
    return [path for _, path, _, idx in self.leaves for _ in idx]

  def flat_indices(self) -> np.ndarray:
    return np.concatenate([idx for *_, idx in self.leaves])

  def gather(self, params, qparams):
    """``(w [n], codes [n] int32, off_grid [n] bool)`` of the sampled weights."""
    pw, qw = jax.tree.leaves(params), jax.tree.leaves(qparams)
    ws, codes, off = [], [], []
    for i, _, spec, idx in self.leaves:
      w, q = pw[i].reshape(-1), qw[i].astype(jnp.float32)
      axes = tuple(range(q.ndim - 1)) if spec.per_channel else tuple(range(q.ndim))
      alpha = jnp.max(jnp.abs(q), axis=axes, keepdims=True)
      alpha = jnp.broadcast_to(alpha, q.shape).reshape(-1)[idx]
      ratio = q.reshape(-1)[idx] / jnp.where(alpha > 0, alpha, 1.0)
      book = jnp.asarray(spec.codebook(), jnp.float32)
      dist = jnp.abs(ratio[:, None] - book[None, :])
      code = jnp.argmin(dist, axis=1).astype(jnp.int32)
      ws.append(w[idx])
      codes.append(code)
      off.append(jnp.min(dist, axis=1) > 1e-3)
    return jnp.concatenate(ws), jnp.concatenate(codes), jnp.concatenate(off)

  def add_epoch(self, traces) -> dict:
    """Appends one epoch's per-step ``(w, codes, off)`` to the window; returns
    the Table 1 figures over the window."""
    self.window.append(tuple(np.asarray(jax.device_get(jnp.stack(t))) for t in zip(*traces)))
    return window_stats(*(np.concatenate(a) for a in zip(*self.window)))

  def save(self, path, last_epoch: int) -> None:
    """Writes the window's traces (``w``, ``codes``: ``[steps, n]``) and the
    sampled weights' paths and flat indices, atomically."""
    w, codes, _ = (np.concatenate(a) for a in zip(*self.window))
    checkpointing.savez_atomic(path, w=w, codes=codes, paths=np.asarray(self.paths()),
                               flat_index=self.flat_indices(), last_epoch=last_epoch)


def window_stats(w: np.ndarray, codes: np.ndarray, off: np.ndarray) -> dict:
  """Table 1 figures over a window: ``w``, ``codes`` of shape ``[steps, n]``."""
  amp = w.max(0) - w.min(0)                         # peak-to-peak per weight
  flips = np.count_nonzero(np.diff(codes, axis=0), axis=0)
  top = int(np.argmax(flips))
  return {
      "tw_window_steps": int(w.shape[0]),
      "tw_amp_max": float(amp.max()), "tw_amp_median": float(np.median(amp)),
      "tw_amp_mean": float(amp.mean()),
      "tw_flips_max": int(flips.max()), "tw_flips_mean": float(flips.mean()),
      "tw_flips_median": float(np.median(flips)),
      "tw_flipped_frac": float(np.mean(flips > 0)),
      "tw_top_flips": int(flips[top]), "tw_top_amp": float(amp[top]),
      "tw_grid_mismatch": int(np.count_nonzero(off)),
  }
