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

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Added to the attention logits of masked keys. Finite (not -inf), so a query
# whose keys are all masked gets a (near) uniform softmax instead of NaN; large
# enough that exp() of it underflows to exactly 0 next to any unmasked key, so
# masked keys have exactly no effect on the other rows.
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


LN_EPSILON = 1e-6


@jax.custom_vjp
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """flax.linen.LayerNorm's forward over the last axis (float32 statistics,
  fast variance E[x^2] - E[x]^2 clipped at 0), result in float32. A custom
  VJP (the textbook LayerNorm gradient, equal to autodiff of the same
  formula) whose residuals are x and two per-row statistics: under autodiff
  XLA:CPU materialised several per-row broadcasts per norm."""
  return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_stats(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean))
  return mean, jax.lax.rsqrt(var + LN_EPSILON)


def _layer_norm_fwd(x, scale, bias):
  xf = x.astype(jnp.float32)
  mean, rstd = _layer_norm_stats(xf)
  y = (xf - mean) * (rstd * scale) + bias
  return y, (x, mean, rstd, scale)


def _layer_norm_bwd(res, g):
  x, mean, rstd, scale = res
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gy = g * scale
  d_x = rstd * (gy - jnp.mean(gy, axis=-1, keepdims=True)
                - xhat * jnp.mean(gy * xhat, axis=-1, keepdims=True))
  lead = tuple(range(g.ndim - 1))
  return d_x.astype(x.dtype), jnp.sum(g * xhat, axis=lead), jnp.sum(g, axis=lead)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm(epsilon=LN_EPSILON) over the last axis, same parameters
  ('scale', 'bias') and values; see `_layer_norm` for why it is not nn.LayerNorm."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", ones_init(("norm",)), (d,), jnp.float32)
    bias = self.param("bias", zeros_init(("norm",)), (d,), jnp.float32)
    return _layer_norm(x, scale, bias).astype(self.dtype)


def layer_norm(dtype: Dtype, name: str | None = None) -> LayerNorm:
  return LayerNorm(dtype=dtype, name=name)


def dense(features: int, in_axis: str | None, out_axis: str | None, dtype: Dtype,
          name: str | None = None, use_bias: bool = True) -> nn.Dense:
  """A Dense layer whose kernel is (in_axis, out_axis) and bias (out_axis,)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=dense_init((in_axis, out_axis)),
                  bias_init=zeros_init((out_axis,)), name=name)


class _Einsum(nn.Module):
  """y = einsum(spec, x, kernel) + bias, kernel and bias created at their real
  rank (nn.DenseGeneral creates a flattened kernel, which a sharding
  constraint for the unflattened logical axes rejects under a mesh).
  `bias_view`: the shape the bias is reshaped to before it is added (to
  broadcast against an output whose axes are not in the bias's order)."""
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_shape: tuple[int, ...]
  bias_axes: tuple[str | None, ...]
  dtype: Dtype = jnp.float32
  bias_view: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", dense_init(self.kernel_axes), self.kernel_shape, jnp.float32)
    bias = self.param("bias", zeros_init(self.bias_axes), self.bias_shape, jnp.float32)
    if self.bias_view is not None:
      bias = bias.reshape(self.bias_view)
    return jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


KEEP_BITS = 16  # Random bits per dropout decision: 4 per Threefry-2x32 evaluation.


def _rotl(x: jax.Array, d: int) -> jax.Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
  """The Threefry-2x32 hash (20 rounds) of jax.random's default keys, written
  out unrolled: XLA fuses it into one elementwise loop, where JAX's own CPU
  lowering is a rolled loop whose 5 iterations each pass over memory
  (threefry was most of the cost of dropout: ~12% of a scale_base-width train
  step with nn.Dropout). Same values as jax's threefry_2x32."""
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _key_words(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two uint32 words of a key: a threefry key's own data (words drawn with
  jax.random.bits instead were 3x slower: XLA then fused the hash worse)."""
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  if data.shape != (2,):  # Another key implementation: draw two words from it.
    data = jax.random.bits(rng, (2,), jnp.uint32)
  return data[0], data[1]


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
  """(bool mask of `shape`, True with probability keep_prob; keep_prob):
  dropout's keep decisions, 16 bits each, four from one Threefry-2x32
  evaluation keyed by `rng` (counters: the leading index and the position
  within it, so the values do not depend on how the array is sharded).
  jax.random.bernoulli draws a 32-bit word and a float per element through
  JAX's rolled-loop threefry: ~7x the time on CPU. keep_prob is 1 - rate
  rounded to a multiple of 2^-16 (|error| <= 7.7e-6), returned so that the
  scaling keeps the expectation exact."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate}: expected 0 <= rate < 1")
  threshold = round(rate * (1 << KEEP_BITS))
  full = tuple(shape) or (1,)
  per_word = 32 // KEEP_BITS
  counters = full[:-1] + (-(-full[-1] // (2 * per_word)),)  # Each counter: two 32-bit words.
  if math.prod(counters[1:]) >= 1 << 32:
    raise ValueError(f"dropout over {shape}: more than 2^32 counters per leading index")
  k0, k1 = _key_words(rng)
  lead = jax.lax.broadcasted_iota(jnp.uint32, counters, 0)
  pos, stride = jnp.zeros(counters, jnp.uint32), 1
  for d in reversed(range(1, len(counters))):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, counters, d) * np.uint32(stride)
    stride *= counters[d]
  words = jnp.stack(_threefry2x32(k0, k1, lead, pos), axis=-1)  # [*counters, 2] uint32
  bits = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [*counters, 2, per_word]
  bits = bits.reshape(full[:-1] + (counters[-1] * 2 * per_word,))[..., :full[-1]]
  keep = bits >= jnp.uint16(threshold)
  return keep.reshape(tuple(shape)), 1.0 - threshold / (1 << KEEP_BITS)


class Dropout(nn.Module):
  """nn.Dropout(rate) (inverted dropout, rng collection 'dropout') with its
  keep decisions from `keep_mask`: a seventh of nn.Dropout's time on CPU."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep, keep_prob = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    return _drop(x, keep, keep_prob)


def _attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
  """softmax(q k^T + bias) in float32: q [B, H, Lq, K], k [B, H, Lk, K], bias [B, Lk].

  On CPU the bias enters the product as one more feature (a column of ones
  on q, the bias on k): XLA:CPU fuses the product and the softmax into one
  kernel, but an added [B, 1, 1, Lk] bias would first be materialised as a
  [B, H, Lq, Lk] broadcast (recomputing the whole key-mask expression, e.g.
  the JCT's concatenation of five masks, at every element). Elsewhere the
  bias is added (an odd K + 1 would pad the matrix units' tiles)."""
  if jax.default_backend() != "cpu":
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits + bias[:, None, None, :], axis=-1)
  b, h, lq, _ = q.shape
  q1 = jnp.concatenate([q, jnp.ones((b, h, lq, 1), q.dtype)], axis=-1)
  kb = jnp.broadcast_to(bias[:, None, :, None].astype(k.dtype), (b, h, k.shape[2], 1))
  k1 = jnp.concatenate([k, kb], axis=-1)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q1, k1, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                    keep: jax.Array | None = None, keep_prob: float = 1.0) -> jax.Array:
  """softmax(q k^T + bias) v per batch row and head, head-major [B, H, L, K]
  (q already scaled); bias [B, Lk] float32, no gradient. `keep` (bool [B, H,
  Lq, Lk] or None): attention dropout, the kept probabilities scaled by
  1 / keep_prob (as flax's nn.Dropout on the probabilities).

  A custom VJP, same values and gradients as autodiff of the same ops (to
  float rounding): the backward pass keeps the probabilities as its only
  [B, H, Lq, Lk] residual and writes its two transposed products (dv, dk)
  as `x^T p` and transposes their small outputs, because XLA:CPU runs a
  batched dot whose left operand contracts its major axis (`p^T x`) on a
  slow generic path. Attention was ~45% of the demo's step. With dropout the
  extra residual is the boolean keep mask (autodiff of the same ops would
  also keep the dropped probabilities, and take the slow path)."""
  return _attention_core_fwd(q, k, v, bias, keep, keep_prob)[0]


def _drop(x: jax.Array, keep: jax.Array | None, keep_prob: float) -> jax.Array:
  if keep is None:
    return x
  return jnp.where(keep, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros((), x.dtype))


def _attention_core_fwd(q, k, v, bias, keep, keep_prob):
  probs = _attention_probs(q, k, bias)
  out = jnp.einsum("bhqk,bhkd->bhqd", _drop(probs, keep, keep_prob).astype(v.dtype), v)
  return out, (q, k, v, probs, keep)


def _attention_core_bwd(keep_prob, res, d_out):
  q, k, v, probs, keep = res
  p = _drop(probs, keep, keep_prob).astype(v.dtype)
  d_v = _transposed_product(d_out, p)
  d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  d_probs = _drop(d_probs, keep, keep_prob)
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
  d_k = _transposed_product(q, d_logits)
  return d_q, d_k, d_v, None, None


def _transposed_product(x: jax.Array, p: jax.Array) -> jax.Array:
  """p^T x per batch row and head ([B, H, Lq, Lk], [B, H, Lq, K] -> [B, H, Lk, K]),
  computed as (x^T p)^T: x^T is a small explicit transpose, and the product
  then contracts the minor axis of its left operand."""
  x_t = jnp.swapaxes(x, 2, 3)
  out = jax.lax.dot_general(x_t, p, (((3,), (2,)), ((0, 1), (0, 1))))
  return jnp.swapaxes(out, 2, 3)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, L, D] with a boolean key mask [B, L].

  Queries, keys and values are projected straight to a head-major
  [B, H, L, K] layout; masked keys get MASK_VALUE added to their logits."""
  heads: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool,
               queries: int | None = None) -> jax.Array:
    """queries: only the first `queries` positions query (output [B, queries, D])."""
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    head_dim = width // self.heads

    def qkv(name, inputs):
      return _Einsum("bld,dhk->bhlk", (width, self.heads, head_dim), ("embed", "heads", "kv"),
                     (self.heads, head_dim), ("heads", "kv"), self.dtype,
                     bias_view=(self.heads, 1, head_dim), name=name)(inputs)

    q = qkv("query", x if queries is None else x[:, :queries])
    k, v = qkv("key", x), qkv("value", x)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    bias = jnp.where(key_mask, 0.0, MASK_VALUE).astype(jnp.float32)
    keep, keep_prob = None, 1.0
    if self.dropout > 0.0 and train:  # Dropout on the attention probabilities.
      keep, keep_prob = keep_mask(self.make_rng("dropout"), q.shape[:3] + (k.shape[2],),
                                  self.dropout)
    out = _attention_core(q, k, v, bias, keep, keep_prob)
    return _Einsum("bhlk,hkd->bld", (self.heads, head_dim, width), ("heads", "kv", "embed"),
                   (width,), ("embed",), self.dtype, name="out")(out)


_GELU_C = 0.7978845608028654  # sqrt(2 / pi), as in jax.nn.gelu.


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """jax.nn.gelu (tanh approximation; flax's nn.gelu) with a hand-written
  VJP: the forward pass keeps only x and the backward pass recomputes the
  tanh. Autodiff of the formula stores several [N, mlp] intermediates in the
  forward pass instead, which made the MLP ~1.6x slower on CPU."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  x2 = xf * xf
  t = jnp.tanh(_GELU_C * (xf + 0.044715 * x2 * xf))
  d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x2)
  return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    h = dense(self.hidden, "embed", "mlp", self.dtype, name="fc1")(x)
    h = gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = Dropout(self.dropout)(h, deterministic=not train)
    return dense(width, "mlp", "embed", self.dtype, name="fc2")(h)


class Block(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""
  heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool = False,
               queries: int | None = None) -> jax.Array:
    """queries: compute only the outputs of the first `queries` positions
    (all positions are still attended): [B, queries, D]. `train` and
    `queries` are positional so that `RematBlock` can keep them static."""
    x = constrain(x)
    h = layer_norm(self.dtype, "ln_attn")(x)
    h = MultiHeadAttention(self.heads, self.dtype, self.dropout, name="attn")(
        h, key_mask, train=train, queries=queries)
    x = x if queries is None else x[:, :queries]
    x = x + Dropout(self.dropout)(h, deterministic=not train)
    h = layer_norm(self.dtype, "ln_mlp")(x)
    h = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, self.dropout, name="mlp")(h, train=train)
    x = x + Dropout(self.dropout)(h, deterministic=not train)
    return constrain(x)


# Each block one checkpoint with no policy (jax.checkpoint_policies.
# nothing_saveable): the backward pass keeps only the block inputs [B, L, D]
# and recomputes the rest, one block at a time. That drops most of the
# activation memory: the [B, H, L, L] attention probabilities and the
# [B, L, mlp_ratio * D] MLP hidden. Saving the matmul outputs
# (dots_with_no_batch_dims_saveable) would keep ~9 [B, L, D]-sized arrays a
# block to spare one extra forward of the blocks. XLA:CPU's default
# (concurrency-optimised) scheduler runs the recomputation early, so remat
# alone saves no memory there (configs/scale_authors.py at batch 64: 16.6 GiB
# compiled temp memory either way); with
# XLA_FLAGS=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED it
# drops to 8.2 GiB (14.8 without remat). GPU/TPU backends keep the checkpoint
# barriers (not measured here). `train` and `queries` (arguments 3 and 4,
# counting the module) stay static.
RematBlock = nn.remat(Block, static_argnums=(3, 4))


def remat_slices(rows: int, max_rows: int) -> int:
  """How many slices `_sliced_remat_call` cuts `rows` sequences into: the
  fewest that divide them with at most `max_rows` rows each."""
  return next(k for k in range(1, rows + 1) if rows % k == 0 and rows // k <= max_rows)


def _sliced_remat_call(block: Block, max_rows: int, x: jax.Array, key_mask: jax.Array,
                       train: bool, queries: int | None) -> jax.Array:
  """block(x, key_mask) with the batch in k = remat_slices(N, max_rows)
  interleaved slices (rows j, j + k, ...: each slice spans every batch
  shard), each slice rematerialised, in a loop: the backward pass recomputes
  and frees one slice's activations at a time, so a block's peak ([B, H, L,
  L] attention, [B, L, mlp] hidden) shrinks k-fold for no extra FLOPs (the
  block input is what is kept either way, as with RematBlock). Same values
  (each row's computation is unchanged); dropout masks differ from RematBlock's."""
  n = x.shape[0]
  k = remat_slices(n, max_rows)

  def step(blk, carry, x_k, mask_k):
    return carry, blk(x_k, mask_k, train, queries)

  scan = nn.scan(nn.remat(step), variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1, length=k)
  _, y = scan(block, None, x.reshape(n // k, k, *x.shape[1:]),
              key_mask.reshape(n // k, k, *key_mask.shape[1:]))
  return y.reshape(n, *y.shape[2:])


def make_block(heads: int, mlp_ratio: int, dtype: Dtype, dropout: float, remat: bool,
               remat_rows: int, name: str) -> nn.Module:
  """An Encoder's block: RematBlock for whole-batch remat, else a Block
  (with `remat_rows` `call_block` rematerialises it by slices of the batch)."""
  return (RematBlock if remat and not remat_rows else Block)(heads, mlp_ratio, dtype, dropout,
                                                              name=name)


def call_block(block: nn.Module, remat: bool, remat_rows: int, x: jax.Array, key_mask: jax.Array,
               train: bool, queries: int | None) -> jax.Array:
  if remat and remat_rows:
    return _sliced_remat_call(block, remat_rows, x, key_mask, train, queries)
  return block(x, key_mask, train, queries)


class _ScannedBlock(nn.Module):
  """One step of `nn.scan` over an Encoder's blocks: (x, key_mask) -> (x, None)."""
  heads: int
  mlp_ratio: int
  dtype: Dtype
  dropout: float
  remat: bool
  remat_rows: int
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array):
    block = make_block(self.heads, self.mlp_ratio, self.dtype, self.dropout, self.remat,
                       self.remat_rows, "block")
    return call_block(block, self.remat, self.remat_rows, x, key_mask, self.train, None), None


class Encoder(nn.Module):
  """`layers` pre-LN blocks and a final LayerNorm; `remat` recomputes each
  block in the backward pass (config.model.remat; same parameters, values and
  gradients), by slices of at most `remat_rows` sequences of the batch, one
  after another, when that is set (config.model.remat_rows: one slice's
  activations at a time; see `_sliced_remat_call`).

  `scan` (config.model.scan_layers) runs the blocks as one `nn.scan` over
  parameters stacked on a leading 'layers' axis (params `blocks/block/...`
  [layers, ...] instead of `block0` .. `block{n-1}`): XLA compiles one block
  per stack instead of every layer (configs/scale_authors.py's train step:
  35 s instead of 79 s), and with `remat` the loop forces the backward pass to
  recompute and free one block at a time, whatever the backend's scheduler
  does (XLA:CPU's otherwise hoists the recomputation; see RematBlock). The
  values are those of the unrolled stack (dropout masks differ)."""
  layers: int
  heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  remat: bool = False
  scan: bool = False
  remat_rows: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool,
               split: tuple[int, int] | None = None):
    """x [N, L, D], key_mask [N, L] -> [N, L, D].

    split = (group, n_full): the N sequences come in N/group groups of `group`
    (group-major), and only the first `n_full` of each group need all their
    outputs; the others need only their [CLS] (position 0), so the last
    block computes only that query for them (e.g. video frames run through
    the image stack: only their [CLS] is used). Returns (full [N/group,
    n_full, L, D], cls [N/group, group - n_full, D]), the same values as
    slicing the full outputs."""
    x = x.astype(self.dtype)
    scanned = self.scan and self.layers > 0
    # With dropout in training the CLS-only last block would draw other masks;
    # scanned, the last block is inside the loop: every position is computed.
    exact_split = (split is not None and self.layers > 0 and not scanned
                   and not (self.dropout > 0.0 and train))
    ln_final = layer_norm(self.dtype, "ln_final")
    if scanned:
      x = self._scanned_blocks(x, key_mask, train=train)
    else:
      blocks = [make_block(self.heads, self.mlp_ratio, self.dtype, self.dropout, self.remat,
                           self.remat_rows, f"block{i}") for i in range(self.layers)]
      for block in blocks[:-1] if exact_split else blocks:
        x = self._call(block, x, key_mask, train, None)
    if split is None:
      return constrain(ln_final(x))
    group, n_full = split
    n, length, d = x.shape
    if not exact_split:
      x = constrain(ln_final(x)).reshape(n // group, group, length, d)
      return x[:, :n_full], x[:, n_full:, 0]
    x = x.reshape(n // group, group, length, d)
    key_mask = key_mask.reshape(n // group, group, length)

    def rows(a, lo, hi):  # Rows lo:hi of every group, flattened group-major.
      return a[:, lo:hi].reshape(-1, *a.shape[2:])

    full = None
    if n_full:
      full = self._call(blocks[-1], rows(x, 0, n_full), rows(key_mask, 0, n_full), train, None)
      full = constrain(ln_final(full)).reshape(n // group, n_full, length, d)
    cls = self._call(blocks[-1], rows(x, n_full, group), rows(key_mask, n_full, group), train, 1)
    cls = constrain(ln_final(cls)).reshape(n // group, group - n_full, d)
    return full, cls

  def _call(self, block, x, key_mask, train, queries):
    return call_block(block, self.remat, self.remat_rows, x, key_mask, train, queries)

  def _scanned_blocks(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    """All the blocks as one `nn.scan` over their stacked parameters."""
    stack = nn.scan(
        _ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast, length=self.layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(
            self.heads, self.mlp_ratio, self.dtype, self.dropout, self.remat, self.remat_rows,
            train, name="blocks")
    return stack(x, key_mask)[0]


class LearnedEmbedding(nn.Module):
  """A learned table [num, width] with logical axes (None, 'embed'), e.g. positions."""
  num: int
  width: int
  stddev: float = 0.02

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("embedding", dense_init((None, "embed"), self.stddev),
                      (self.num, self.width), jnp.float32)
