"""m5p.flops.compiled_flops: XLA's cost analysis corrected for loops and conditionals."""
import jax
import jax.numpy as jnp
import pytest

from m5p import flops

N, D, L = 32, 128, 6
MATMUL = 2 * N * D * D  # One [N, D] x [D, D] product.


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _scanned(w, x):
  return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()


def _unrolled(w, x):
  for i in range(L):
    x = jnp.tanh(x @ w[i])
  return x.sum()


@pytest.mark.parametrize("grad", [False, True])
def test_a_scanned_loop_counts_as_its_unrolled_twin(grad):
  w, x = jnp.ones((L, D, D)), jnp.ones((N, D))
  wrap = jax.grad if grad else (lambda f: f)
  scanned = flops.compiled_flops(_compile(wrap(_scanned), w, x))
  unrolled = flops.compiled_flops(_compile(wrap(_unrolled), w, x))
  expected = (3 if grad else 1) * L * MATMUL
  assert scanned == pytest.approx(expected, rel=0.02)
  # Unrolled, the first layer's input gradient (x is not differentiated) is pruned.
  assert unrolled == pytest.approx(expected - (MATMUL if grad else 0), rel=0.05)  # + elementwise.
  # XLA alone counts the loop body once.
  assert _compile(wrap(_scanned), w, x).cost_analysis()["flops"] < expected / 2


def test_nested_loops_multiply_their_trip_counts():
  w, x = jnp.ones((2, 3, D, D)), jnp.ones((N, D))

  def nested(w, x):
    inner = lambda c, ws: (jax.lax.scan(lambda c2, wi: (jnp.tanh(c2 @ wi), None), c, ws)[0], None)
    return jax.lax.scan(inner, x, w)[0].sum()

  assert flops.compiled_flops(_compile(nested, w, x)) == pytest.approx(6 * MATMUL, rel=0.02)


def test_a_conditional_counts_its_cheapest_branch_unless_asked_for_xla():
  w, x = jnp.ones((D, D)), jnp.ones((N, D))

  def branchy(w, x, p):
    return jax.lax.cond(p, lambda: x @ w @ w @ w, lambda: x @ w).sum()

  compiled = _compile(branchy, w, x, True)
  assert flops.compiled_flops(compiled) == pytest.approx(MATMUL, rel=0.05)
  assert flops.compiled_flops(compiled, conditionals="xla") == pytest.approx(3 * MATMUL, rel=0.05)
  with pytest.raises(ValueError, match="conditionals"):
    flops.compiled_flops(compiled, conditionals="mean")
