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
``tracked_weights.npz``.

The code index is the library's: the index in ``spec.codebook()`` that
``bq.pack_params`` stores for the weight (so ``ŵ = α · codebook[index]``
exactly), read from the packed codes of the sampled weights (``bits`` bits
per weight, lowest bit first). ``tw_grid_mismatch`` is kept in the rows for
their schema; the codes being exact, it is 0.
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
    self.window = collections.deque(maxlen=window_epochs)   # per epoch: (w, codes)
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

  def gather(self, params, packed):
    """``(w [n], codes [n] int32)`` of the sampled weights; ``packed`` is
    ``bq.pack_params`` of the weights whose codes are followed."""
    pw = jax.tree.leaves(params)
    pk = jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, bq.PackedArray))
    ws, codes = [], []
    for i, _, spec, idx in self.leaves:
      ws.append(pw[i].reshape(-1)[idx])
      codes.append(_code_indices(pk[i], spec, idx))
    return jnp.concatenate(ws), jnp.concatenate(codes)

  def add_epoch(self, traces) -> dict:
    """Appends one epoch's per-step ``(w, codes)`` to the window; returns the
    Table 1 figures over the window."""
    w, codes = (np.asarray(jax.device_get(jnp.stack(t))) for t in zip(*traces))
    self.window.append((w, codes))
    return window_stats(*(np.concatenate(a) for a in zip(*self.window)))

  def save(self, path, last_epoch: int) -> None:
    """Writes the window's traces (``w``, ``codes``: ``[steps, n]``) and the
    sampled weights' paths and flat indices, atomically."""
    w, codes = (np.concatenate(a) for a in zip(*self.window))
    checkpointing.savez_atomic(path, w=w, codes=codes, paths=np.asarray(self.paths()),
                               flat_index=self.flat_indices(), last_epoch=last_epoch)


def _code_indices(packed: bq.PackedArray, spec: bq.QuantSpec, idx: np.ndarray):
  """The codebook indices of the weights at flat positions ``idx`` of a packed leaf."""
  bits = spec.bits
  pos = idx.astype(np.int64)[:, None] * bits + np.arange(bits)   # the weights' bits
  byte = packed.codes[pos // 8].astype(jnp.int32)
  code = jnp.sum(((byte >> (pos % 8)) & 1) << np.arange(bits), axis=1)
  book = spec.codebook()
  if spec.is_binary:
    return code
  # The packed codes store -0.0 at the spare index len(book): it is the code 0.
  return jnp.where(code == len(book), int(np.searchsorted(book, 0.0)), code)


def window_stats(w: np.ndarray, codes: np.ndarray) -> dict:
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
      "tw_grid_mismatch": 0,
  }
