"""The one switch between the standard transformer ops and the CPU-tuned ones.

config.model.kernels:
  'standard'  flax's nn.LayerNorm, nn.gelu and nn.Dropout, plain dots for
              the dense layers, and jax.nn.dot_product_attention with
              config.model.attention_impl (None: JAX's choice, 'xla', or
              'cudnn': cuDNN's fused flash attention on NVIDIA GPUs). What a
              GPU or TPU runs.
  'cpu'       m5p.models.cpu_kernels: the same values, faster on XLA:CPU.
  'auto'      (default) 'cpu' where the program runs on a CPU, 'standard'
              everywhere else, chosen by jax.lax.platform_dependent when the
              program is lowered for its platform, not when it is traced: a
              serving function exported for ('cpu', 'cuda', 'tpu') carries
              both, and each platform runs its own. Lowered for one platform,
              the other branch is not even emitted.

Attention dropout in training (config.model.attention_dropout > 0): the
standard path then runs flax's nn.dot_product_attention (jax.nn's has no
dropout), so attention_impl='cudnn' needs attention_dropout=0.

Every op here keeps the parameter names and shapes of its flax counterpart,
so checkpoints and exports do not depend on the switch.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m5p.models import cpu_kernels

KERNELS = ("auto", "standard", "cpu")
ATTENTION_IMPLS = (None, "xla", "cudnn")
LN_EPSILON = 1e-6

Dtype = Any


def check(kernels: str, attention_impl: str | None, attention_dropout: float) -> None:
  """Refuses what the switch cannot run, naming the config fields."""
  if kernels not in KERNELS:
    raise ValueError(f"config.model.kernels={kernels!r}: expected one of {KERNELS}")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={attention_impl!r}: expected one of "
                     f"{ATTENTION_IMPLS}")
  if attention_impl == "cudnn" and attention_dropout > 0:
    raise ValueError(
        f"config.model.attention_impl='cudnn' with attention dropout {attention_dropout}: "
        "cuDNN attention through jax.nn.dot_product_attention has no dropout; set "
        "--config.model.attention_dropout=0 (hidden-state dropout, model.dropout, stays).")


def _by_platform(kernels: str, cpu: Callable, standard: Callable) -> Callable:
  """The function `kernels` selects; for 'auto', one that picks per lowering platform."""
  if kernels == "cpu":
    return cpu
  if kernels == "standard":
    return standard
  return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu, default=standard)


# ----------------------------------------------------------------- LayerNorm --

def _scale_init():
  return nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))


def _bias_init():
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))


def _flax_layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=_scale_init(), bias_init=_bias_init(), name=name)


class _SwitchedLayerNorm(nn.Module):
  """nn.LayerNorm's parameters ('scale', 'bias'; logical axis 'norm'), its
  math from cpu_kernels.layer_norm, or from either by platform ('auto')."""
  kernels: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", _scale_init(), (d,), jnp.float32)
    bias = self.param("bias", _bias_init(), (d,), jnp.float32)

    def cpu(x, scale, bias):
      return cpu_kernels.layer_norm(x, scale, bias, LN_EPSILON).astype(self.dtype)

    def standard(x, scale, bias):
      return _flax_layer_norm(self.dtype).apply({"params": {"scale": scale, "bias": bias}}, x)

    return _by_platform(self.kernels, cpu, standard)(x, scale, bias)


def layer_norm(kernels: str, dtype: Dtype, name: str | None = None) -> nn.Module:
  """LayerNorm over the last axis (epsilon 1e-6, float32 statistics and params)."""
  if kernels == "standard":
    return _flax_layer_norm(dtype, name)
  return _SwitchedLayerNorm(kernels, dtype, name=name)


# ---------------------------------------------------------------------- gelu --

def gelu(kernels: str, x: jax.Array) -> jax.Array:
  """nn.gelu (tanh approximation)."""
  return _by_platform(kernels, cpu_kernels.gelu, nn.gelu)(x)


# ------------------------------------------------------------------- dropout --

def _flax_dropout(rate: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  def drop(x, rng):
    return nn.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": rng})
  return drop


class _SwitchedDropout(nn.Module):
  """nn.Dropout's interface (rng collection 'dropout'), cpu_kernels.dropout's masks."""
  kernels: str
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)

    def cpu(x, rng):
      return cpu_kernels.dropout(x, rng, self.rate)

    return _by_platform(self.kernels, cpu, _flax_dropout(self.rate))(x, self.make_rng("dropout"))


def dropout(kernels: str, rate: float) -> nn.Module:
  """A dropout module called as nn.Dropout is: `(x, deterministic=...)`."""
  if kernels == "standard":
    return nn.Dropout(rate)
  return _SwitchedDropout(kernels, rate)


# ------------------------------------------------------------- dense layers --

# The checkpoint name of every dense product's output (before its bias): what
# the 'dots' remat policy keeps (m5p.models.layers.REMAT_POLICIES), whichever
# kernels computed it.
DENSE_OUTPUT = "dense_output"


def matmul(kernels: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N], both in the compute dtype."""
  def standard(x, w):
    return jnp.dot(x, w)
  return checkpoint_name(_by_platform(kernels, cpu_kernels.matmul, standard)(x, w), DENSE_OUTPUT)


def dense_dot_general(kernels: str) -> Callable:
  """nn.Dense's `dot_general` for these kernels: lax.dot_general on the
  standard ones; its output named DENSE_OUTPUT either way."""
  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if kernels == "standard":
      out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                preferred_element_type=preferred_element_type)
      return checkpoint_name(out, DENSE_OUTPUT)
    if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(dimension_numbers[1]):
      raise ValueError(f"dense_dot_general: not a dense product: {dimension_numbers}")
    return matmul(kernels, lhs, rhs)

  return dot_general


# ----------------------------------------------------------------- attention --

def _standard_attention(implementation: str | None, dropout_rate: float):
  def attend(q, k, v, key_mask, dropout_rng=None):
    mask = key_mask[:, None, None, :]
    if dropout_rng is None:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    # jax.nn's attention has no dropout: flax's (float32 softmax, a mask per
    # element; its float32 probabilities promote the output, cast back).
    return nn.dot_product_attention(q, k, v, mask=mask, dropout_rng=dropout_rng,
                                    dropout_rate=dropout_rate, broadcast_dropout=False,
                                    deterministic=False,
                                    force_fp32_for_softmax=True).astype(q.dtype)
  return attend


def attention(kernels: str, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *,
              implementation: str | None = None, dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v over the keys where key_mask [B, Lk] is True:
  q [B, Lq, H, K], k and v [B, Lk, H, K] -> [B, Lq, H, K]. With `dropout_rng`
  the probabilities are dropped at `dropout_rate`."""
  args = (q, k, v, key_mask)
  if dropout_rng is not None and dropout_rate > 0.0:
    args += (dropout_rng,)

  def cpu(q, k, v, key_mask, dropout_rng=None):
    return cpu_kernels.attention(q, k, v, key_mask, dropout_rng, dropout_rate)

  return _by_platform(kernels, cpu, _standard_attention(implementation, dropout_rate))(*args)
