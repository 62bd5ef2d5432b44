"""A small decoder-only transformer (GPT-style, pre-norm) in Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Pre-norm block: causal multi-head self-attention, then a GELU MLP."""

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    y = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Bytes in, next-byte logits out: token and learned position embeddings,
  ``num_layers`` blocks, a final layer norm and a linear head."""

  def __init__(self, vocab_size: int = 256, d_model: int = 128, num_layers: int = 2,
               num_heads: int = 4, mlp_ratio: int = 4, max_len: int = 128, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
    self.blocks = nnx.List([Block(d_model, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos_embed[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
