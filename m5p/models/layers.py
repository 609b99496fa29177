"""Transformer building blocks with logical axis names on every parameter.

Parameters are float32 and annotated with `nn.with_logical_partitioning`;
`m5p.sharding` maps the logical names to mesh axes. Names used here:

  embed   model width
  mlp     MLP hidden width
  heads   attention heads
  kv      per-head width
  vocab   vocabulary rows / LM logits
  patch   flattened patch / regression target values
  norm    LayerNorm scale and bias
  proj    contrastive projection width
  None    positions, segment / type / field tables, the LM transform's output

Activations are constrained at block boundaries to ('batch', 'length', 'embed').
Outside a mesh and `nn.logical_axis_rules` context the constraints are no-ops.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Added to the attention logits of masked keys. Finite (not -inf), so a query
# whose keys are all masked gets a uniform softmax instead of NaN; large enough
# that exp() of it underflows to exactly 0 next to any unmasked key, so masked
# keys have exactly no effect on the other rows.
MASK_VALUE = -1e9

ACTIVATION_AXES = ("batch", "length", "embed")


def compute_dtype(name: str) -> Dtype:
  """'float32' / 'bfloat16' (config.model.dtype) -> a jnp dtype."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in dtypes:
    raise ValueError(f"config.model.dtype={name!r}: expected one of {sorted(dtypes)}")
  return dtypes[name]


def dense_init(axes: Sequence[str | None], stddev: float = 0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(axes))


def zeros_init(axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def ones_init(axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None] = ACTIVATION_AXES) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=ones_init(("norm",)), bias_init=zeros_init(("norm",)),
                      name=name)


def dense(features: int, in_axis: str | None, out_axis: str | None, dtype: Dtype,
          name: str | None = None, use_bias: bool = True) -> nn.Dense:
  """A Dense layer whose kernel is (in_axis, out_axis) and bias (out_axis,)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=dense_init((in_axis, out_axis)),
                  bias_init=zeros_init((out_axis,)), name=name)


class _Einsum(nn.Module):
  """y = einsum(spec, x, kernel) + bias, kernel and bias created at their real
  rank (nn.DenseGeneral creates a flattened kernel, which a sharding
  constraint for the unflattened logical axes rejects under a mesh)."""
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_shape: tuple[int, ...]
  bias_axes: tuple[str | None, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", dense_init(self.kernel_axes), self.kernel_shape, jnp.float32)
    bias = self.param("bias", zeros_init(self.bias_axes), self.bias_shape, jnp.float32)
    return jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, L, D] with a boolean key mask [B, L]."""
  heads: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    head_dim = width // self.heads

    def qkv(name):
      return _Einsum("bld,dhk->blhk", (width, self.heads, head_dim), ("embed", "heads", "kv"),
                     (self.heads, head_dim), ("heads", "kv"), self.dtype, name=name)(x)

    q, k, v = qkv("query"), qkv("key"), qkv("value")
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.dropout > 0.0:
      probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return _Einsum("blhk,hkd->bld", (self.heads, head_dim, width), ("heads", "kv", "embed"),
                   (width,), ("embed",), self.dtype, name="out")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    h = dense(self.hidden, "embed", "mlp", self.dtype, name="fc1")(x)
    h = nn.gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return dense(width, "mlp", "embed", self.dtype, name="fc2")(h)


class Block(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""
  heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    x = constrain(x)
    h = layer_norm(self.dtype, "ln_attn")(x)
    h = MultiHeadAttention(self.heads, self.dtype, self.dropout, name="attn")(h, key_mask, train=train)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = layer_norm(self.dtype, "ln_mlp")(x)
    h = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, self.dropout, name="mlp")(h, train=train)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    return constrain(x)


class Encoder(nn.Module):
  """`layers` pre-LN blocks and a final LayerNorm."""
  layers: int
  heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    for i in range(self.layers):
      x = Block(self.heads, self.mlp_ratio, self.dtype, self.dropout, name=f"block{i}")(
          x, key_mask, train=train)
    return constrain(layer_norm(self.dtype, "ln_final")(x))


class LearnedEmbedding(nn.Module):
  """A learned table [num, width] with logical axes (None, 'embed'), e.g. positions."""
  num: int
  width: int
  stddev: float = 0.02

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("embedding", dense_init((None, "embed"), self.stddev),
                      (self.num, self.width), jnp.float32)
