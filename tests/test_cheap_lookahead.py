"""blaq_jax.contrib's one-gradient forms of BLAQ's lookahead: reductions and the toy."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import blaq_jax as bq
import blaq_jax.contrib as cl
from helpers import bit_exact
from test_laq_blaq import mlp_problem, run, toy_flips


def assert_trees_close(x, y, rtol=1e-7, atol=0.0):
  chex.assert_trees_all_close(x, y, rtol=rtol, atol=atol)


def test_reuse_and_model_are_laq_when_the_gradient_is_constant():
  c = {"k": jnp.array([[0.3, -0.2], [0.1, 0.05]]), "b": jnp.array([1.0, -1.0])}
  loss = lambda p: sum(jnp.vdot(c[k], p[k]) for k in p)
  params = {"k": jnp.array([[0.5, -0.5], [0.2, 0.1]]), "b": jnp.zeros(2)}
  spec = {"k": bq.QuantSpec(1), "b": None}
  _, _, h_laq = run(bq.laq(1e-2, spec), spec, params, loss, 8)
  _, _, h_reuse = run(cl.blaq_reuse(1e-2, spec), spec, params, loss, 8)
  assert_trees_close(h_reuse, h_laq, rtol=1e-6, atol=1e-8)
  # For the model variant: same for leaves that are not quantized.
  spec_fp = {"k": None, "b": None}
  _, _, h_laq = run(bq.laq(1e-2, spec_fp), spec_fp, params, loss, 8)
  _, _, h_model = run(cl.blaq_model(1e-2, spec_fp), spec_fp, params, loss, 8)
  assert_trees_close(h_model, h_laq, rtol=1e-6, atol=1e-8)


@bit_exact
def test_model_a1_is_laq():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=2)
  _, _, h_laq = run(bq.laq(1e-2, spec), spec, params, loss, 10)
  _, _, h_model = run(cl.blaq_model(1e-2, spec, a=1.0), spec, params, loss, 10)
  assert_trees_close(h_model, h_laq, rtol=1e-6, atol=1e-8)


def test_reuse_ignores_updates_and_calls_grad_fn_once():
  params, loss = mlp_problem()
  spec = bq.quant_spec(params, bits=1)
  tx = cl.blaq_reuse(1e-2, spec)
  state = tx.init(params)
  calls = []

  def grad_fn(p):
    calls.append(1)
    return jax.grad(loss)(p)

  zeros = optax.tree.zeros_like(params)
  u1, s1 = tx.update(zeros, state, params, grad_fn=grad_fn)
  u2, s2 = tx.update(jax.grad(loss)(params), state, params, grad_fn=grad_fn)
  assert len(calls) == 2
  assert_trees_close(u1, u2, rtol=0)
  assert bq.curvature(s1)["l1"]["kernel"].shape == (8, 16)


@pytest.mark.parametrize("factory", [cl.blaq_reuse, cl.blaq_model])
def test_fig1_toy_settles(factory):
  flips, last = toy_flips(lambda lr, s: factory(lr, s), 0.1)
  laq_flips, _ = toy_flips(lambda lr, s: bq.laq(lr, s), 0.1)
  assert flips == 0 and last < 50 and laq_flips >= 5, (flips, last, laq_flips)
