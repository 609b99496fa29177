"""XLA:CPU-tuned versions of the transformer's hot ops (config.model.kernels='cpu').

Same values as the standard ops (flax's nn.LayerNorm, nn.gelu, nn.Dropout and
softmax attention) to float rounding; what differs is what XLA:CPU makes of
them. Each exists because a profile of a train step on CPU said so:

  layer_norm  custom VJP keeping x and two per-row statistics (autodiff of
              the formula materialised several per-row broadcasts per norm)
  gelu        custom VJP keeping x only, recomputing the tanh (autodiff kept
              several [N, mlp] intermediates: the MLP ran ~1.6x slower)
  dropout     keep decisions from an unrolled Threefry-2x32, 16 bits each
              (jax.random's CPU lowering is a rolled loop with a pass over
              memory per round: ~7x the time)
  attention   custom VJP over head-major [B, H, L, K] whose only [B, H, Lq,
              Lk] residual is the probabilities (plus a bool keep mask with
              dropout), the key mask folded into the product as one more
              feature, and the backward pass's transposed products written
              as x^T p (XLA:CPU runs p^T x on a slow generic path)
  matmul      the dense layers' x @ w; in bfloat16, every product (forward
              and both backward ones) takes bf16 operands and accumulates in
              float32 (preferred_element_type), then rounds to bf16. XLA:CPU
              runs a bf16 x bf16 -> bf16 dot by converting it to float32
              (float32 speed plus the converts), but bf16 x bf16 -> f32 on
              its bf16 units (AVX512-BF16, AMX): 1.9x float32 on a Zen 4 core.
              Autodiff of the same cannot do this: its backward products
              would get a float32 cotangent against a bf16 operand.

Only `m5p.models.kernels` may import this module: it is the one switch
between these and the standard ops. Every function runs inside the named
scope `m5p_cpu_kernels`, so a lowered program shows where they are (the
export test checks that no GPU or TPU module holds any).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SCOPE = "m5p_cpu_kernels"

# Added to the attention logits of masked keys. Finite (not -inf), so a query
# whose keys are all masked gets a uniform softmax instead of NaN (as the
# standard path's boolean mask does); large enough that exp() of it underflows
# to exactly 0 next to any unmasked key.
MASK_VALUE = -1e9


# ----------------------------------------------------------------- LayerNorm --

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  # flax's fast variance, E[x^2] - E[x]^2 clipped at 0.
  var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean))
  rstd = jax.lax.rsqrt(var + epsilon)
  return (xf - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, res, g):
  del epsilon
  x, mean, rstd, scale = res
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gy = g * scale
  d_x = rstd * (gy - jnp.mean(gy, axis=-1, keepdims=True)
                - xhat * jnp.mean(gy * xhat, axis=-1, keepdims=True))
  lead = tuple(range(g.ndim - 1))
  return d_x.astype(x.dtype), jnp.sum(g * xhat, axis=lead), jnp.sum(g, axis=lead)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """LayerNorm over the last axis, float32 statistics and result (the caller casts)."""
  with jax.named_scope(f"{SCOPE}/layer_norm"):
    return _layer_norm(x, scale, bias, epsilon)


# ---------------------------------------------------------------------- gelu --

_GELU_C = 0.7978845608028654  # sqrt(2 / pi), as in jax.nn.gelu.


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return _gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  x2 = xf * xf
  t = jnp.tanh(_GELU_C * (xf + 0.044715 * x2 * xf))
  d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x2)
  return ((g.astype(jnp.float32) * d).astype(g.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x: jax.Array) -> jax.Array:
  """nn.gelu (tanh approximation)."""
  with jax.named_scope(f"{SCOPE}/gelu"):
    return _gelu(x)


# ------------------------------------------------------------------- dropout --

KEEP_BITS = 16  # Random bits per dropout decision: 4 per Threefry-2x32 evaluation.


def _rotl(x: jax.Array, d: int) -> jax.Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
  """The Threefry-2x32 hash (20 rounds) of jax.random's default keys, written
  out unrolled so that XLA fuses it into one elementwise loop. Same values as
  jax's threefry_2x32."""
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
  """(bool mask of `shape`, True with probability keep_prob; keep_prob).

  16 bits a decision, four from one Threefry-2x32 evaluation keyed by `rng`
  (counters: the leading index and the position within it, so the values do
  not depend on how the array is sharded). keep_prob is 1 - rate rounded to
  a multiple of 2^-16 (|error| <= 7.7e-6), returned so that the scaling keeps
  the expectation exact."""
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


def _drop(x: jax.Array, keep: jax.Array | None, keep_prob: float) -> jax.Array:
  if keep is None:
    return x
  return jnp.where(keep, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros((), x.dtype))


def dropout(x: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout at `rate` (0 <= rate < 1) with `keep_mask`'s decisions."""
  with jax.named_scope(f"{SCOPE}/dropout"):
    keep, keep_prob = keep_mask(rng, x.shape, rate)
    return _drop(x, keep, keep_prob)


# -------------------------------------------------------------------- matmul --

def _product(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """a @ b (2-D) accumulated in float32, rounded to out_dtype."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


@jax.custom_vjp
def _matmul_low_precision(x: jax.Array, w: jax.Array) -> jax.Array:
  return _product(x, w, x.dtype)


def _matmul_fwd(x, w):
  return _product(x, w, x.dtype), (x, w)


def _swap_last_two(a: jax.Array) -> jax.Array:
  """a with its last two axes swapped, laid out so in memory when that pays.

  XLA:CPU's bf16 products (bf16 x bf16 -> f32 on its bf16 units) take only
  [..., M, K] x [..., K, N] operands in row-major memory; a product with a
  transposed operand runs in float32 instead. XLA folds a transpose into the
  product's dimension numbers (TransposeFolding, even across an
  optimization_barrier), so for bf16 the swap is a gather of the flat array,
  which nothing folds: 1.6-2x the float32 product's speed, the gather
  included, on a Zen 4 core. Under a mesh of several devices the gather would
  need the whole array on every device, so there (and in float32) it is a
  plain transpose."""
  axes = tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2)
  if a.dtype == jnp.float32 or jax.sharding.get_abstract_mesh().size > 1:
    return jnp.transpose(a, axes)
  flat = jax.lax.iota(jnp.int32, a.size).reshape(a.shape)
  return a.reshape(-1)[jnp.transpose(flat, axes)]


def _matmul_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  return _product(g, _swap_last_two(w), x.dtype), _product(_swap_last_two(x), g, w.dtype)


_matmul_low_precision.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype (w already cast to it)."""
  with jax.named_scope(f"{SCOPE}/matmul"):
    if x.dtype == jnp.float32:
      return jnp.dot(x, w)
    lead = x.shape[:-1]
    y = _matmul_low_precision(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))
    return y.reshape(*lead, w.shape[-1])


# ----------------------------------------------------------------- attention --

def _attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
  """softmax(q k^T + bias) in float32: q [B, H, Lq, K], k [B, H, Lk, K], bias [B, Lk].

  The bias enters the product as one more feature (a column of ones on q,
  the bias on k): XLA:CPU fuses the product and the softmax into one kernel,
  where an added [B, 1, 1, Lk] bias would first be materialised as a
  [B, H, Lq, Lk] broadcast (recomputing the whole key-mask expression, e.g.
  the JCT's concatenation of five masks, at every element)."""
  b, h, lq, _ = q.shape
  q1 = jnp.concatenate([q, jnp.ones((b, h, lq, 1), q.dtype)], axis=-1)
  kb = jnp.broadcast_to(bias[:, None, :, None].astype(k.dtype), (b, h, k.shape[2], 1))
  k1 = jnp.concatenate([k, kb], axis=-1)
  logits = jnp.einsum("bhqd,bhdk->bhqk", q1, _swap_last_two(k1), preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                    keep: jax.Array | None, keep_prob: float) -> jax.Array:
  """softmax(q k^T + bias) v, head-major [B, H, L, K] (q already scaled);
  `keep` (bool [B, H, Lq, Lk] or None): attention dropout. Same values and
  gradients as autodiff of the same ops (to float rounding); see the module
  docstring for why it has its own VJP."""
  return _attention_core_fwd(q, k, v, bias, keep, keep_prob)[0]


def _batched(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """einsum accumulated in float32, rounded to out_dtype (see `matmul`)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _attention_core_fwd(q, k, v, bias, keep, keep_prob):
  probs = _attention_probs(q, k, bias)
  out = _batched("bhqk,bhkd->bhqd", _drop(probs, keep, keep_prob).astype(v.dtype), v, v.dtype)
  return out, (q, k, v, probs, keep)


def _attention_core_bwd(keep_prob, res, d_out):
  q, k, v, probs, keep = res
  p = _drop(probs, keep, keep_prob).astype(v.dtype)
  d_v = _transposed_product(d_out, p)
  d_probs = jnp.einsum("bhqd,bhdk->bhqk", d_out, _swap_last_two(v),
                       preferred_element_type=jnp.float32)
  d_probs = _drop(d_probs, keep, keep_prob)
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_logits = d_logits.astype(q.dtype)
  d_q = _batched("bhqk,bhkd->bhqd", d_logits, k, q.dtype)
  d_k = _transposed_product(q, d_logits)
  return d_q, d_k, d_v, None, None


def _transposed_product(x: jax.Array, p: jax.Array) -> jax.Array:
  """p^T x per batch row and head ([B, H, Lq, Lk], [B, H, Lq, K] -> [B, H, Lk, K]),
  computed as (x^T p)^T: x^T is a small explicit transpose, and the product
  then contracts the minor axis of its left operand."""
  out = jax.lax.dot_general(_swap_last_two(x), p, (((3,), (2,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.swapaxes(out, 2, 3)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
              dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
  """Scaled dot-product attention as jax.nn.dot_product_attention computes it:
  q [B, Lq, H, K], k and v [B, Lk, H, K] -> [B, Lq, H, K], key_mask [B, Lk]
  bool (False: never attended). With `dropout_rng`, the probabilities are
  dropped at `dropout_rate` (inverted)."""
  with jax.named_scope(f"{SCOPE}/attention"):
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # Head-major [B, H, L, K].
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    bias = jnp.where(key_mask, 0.0, MASK_VALUE).astype(jnp.float32)
    keep, keep_prob = None, 1.0
    if dropout_rng is not None and dropout_rate > 0.0:
      keep, keep_prob = keep_mask(dropout_rng, q.shape[:3] + (k.shape[2],), dropout_rate)
    return jnp.swapaxes(_attention_core(q, k, v, bias, keep, keep_prob), 1, 2)
