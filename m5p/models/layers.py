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

The block is the standard pre-LN transformer of the flax examples. Its
LayerNorm, gelu, dropout and attention come from `m5p.models.kernels`, the
switch (config.model.kernels) between flax/JAX's own ops and the XLA:CPU-tuned
ones, which no module but that switch knows.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m5p.models import kernels

Dtype = Any

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


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """How every transformer stack of a model is built: config.model's fields
  (see `from_config`), in one hashable value the towers pass down."""
  heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  dropout: float = 0.0  # Hidden states and embeddings.
  attention_dropout: float = 0.0  # Attention probabilities.
  kernels: str = "auto"  # m5p.models.kernels: 'auto' | 'standard' | 'cpu'.
  attention_impl: str | None = None  # jax.nn.dot_product_attention's: None | 'xla' | 'cudnn'.
  remat: bool = False
  remat_rows: int = 0
  remat_policy: str = "nothing"  # What a remat'd block keeps (REMAT_POLICIES).
  remat_small_rows: int = 0  # Stack calls on at most this many sequences ...
  remat_small_policy: str = "dots"  # ... use this policy instead ('none': no remat).
  scan: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "StackConfig":
    m = config.model
    attention_dropout = m.get("attention_dropout", None)
    attention_dropout = float(m.dropout if attention_dropout is None else attention_dropout)
    kernels_name, impl = m.get("kernels", "auto"), m.get("attention_impl", None)
    kernels.check(kernels_name, impl, attention_dropout)
    return cls(heads=int(m.heads), mlp_ratio=int(m.mlp_ratio), dtype=compute_dtype(m.dtype),
               dropout=float(m.dropout), attention_dropout=attention_dropout,
               kernels=kernels_name, attention_impl=impl, remat=bool(m.get("remat", False)),
               remat_rows=int(m.get("remat_rows", 0)),
               remat_policy=str(m.get("remat_policy", "nothing")),
               remat_small_rows=int(m.get("remat_small_rows", 0)),
               remat_small_policy=str(m.get("remat_small_policy", "dots")),
               scan=bool(m.get("scan_layers", False)))


def layer_norm(cfg: StackConfig, name: str | None = None) -> nn.Module:
  """LayerNorm (epsilon 1e-6) computing in cfg.dtype: nn.LayerNorm on the
  standard kernels (m5p.models.kernels)."""
  return kernels.layer_norm(cfg.kernels, cfg.dtype, name)


def dropout(cfg: StackConfig, rate: float | None = None) -> nn.Module:
  """nn.Dropout(rate, default cfg.dropout) on the standard kernels."""
  return kernels.dropout(cfg.kernels, cfg.dropout if rate is None else rate)


def gelu(cfg: StackConfig, x: jax.Array) -> jax.Array:
  return kernels.gelu(cfg.kernels, x)


def dense(features: int, in_axis: str | None, out_axis: str | None, dtype: Dtype,
          name: str | None = None, use_bias: bool = True, kernels_name: str = "standard"
          ) -> nn.Dense:
  """A Dense layer whose kernel is (in_axis, out_axis) and bias (out_axis,);
  `kernels_name` (config.model.kernels) picks its product's implementation."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=dense_init((in_axis, out_axis)),
                  bias_init=zeros_init((out_axis,)), name=name,
                  dot_general=kernels.dense_dot_general(kernels_name))


class Projection(nn.Module):
  """A dense layer over the trailing axes of x, with a kernel of shape
  `in_shape + out_shape` created at its real rank (nn.DenseGeneral flattens
  its kernel, which a sharding constraint on the unflattened logical axes
  rejects under a mesh): x [..., *in_shape] -> [..., *out_shape]."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  cfg: "StackConfig"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.cfg.dtype
    kernel = self.param("kernel", dense_init(self.kernel_axes), self.in_shape + self.out_shape,
                        jnp.float32)
    bias = self.param("bias", zeros_init(self.bias_axes), self.out_shape, jnp.float32)
    n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
    lead = x.shape[:x.ndim - len(self.in_shape)]
    y = kernels.matmul(self.cfg.kernels, x.astype(dtype).reshape(*lead, n_in),
                       kernel.astype(dtype).reshape(n_in, n_out))
    return y.reshape(*lead, *self.out_shape) + bias.astype(dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, L, D] with a boolean key mask [B, L] (False:
  never attended): q, k, v projected to [B, L, heads, head_dim], then
  `kernels.attention` (jax.nn.dot_product_attention on the standard kernels)."""
  cfg: StackConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool,
               queries: int | None = None) -> jax.Array:
    """queries: only the first `queries` positions query (output [B, queries, D])."""
    cfg = self.cfg
    width = x.shape[-1]
    if width % cfg.heads:
      raise ValueError(f"width {width} is not divisible by heads {cfg.heads}")
    head_dim = width // cfg.heads

    def project(name, inputs):  # [B, L, D] -> [B, L, heads, head_dim]
      return Projection((width,), (cfg.heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                        cfg, name=name)(inputs)

    q = project("query", x if queries is None else x[:, :queries])
    k, v = project("key", x), project("value", x)
    drop = train and cfg.attention_dropout > 0.0
    out = kernels.attention(cfg.kernels, q, k, v, key_mask, implementation=cfg.attention_impl,
                            dropout_rate=cfg.attention_dropout,
                            dropout_rng=self.make_rng("dropout") if drop else None)
    return Projection((cfg.heads, head_dim), (width,), ("heads", "kv", "embed"), ("embed",), cfg,
                      name="out")(out)


class Mlp(nn.Module):
  cfg: StackConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    h = dense(cfg.mlp_ratio * x.shape[-1], "embed", "mlp", cfg.dtype, "fc1", True, cfg.kernels)(x)
    h = gelu(cfg, h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = dropout(cfg)(h, deterministic=not train)
    return dense(x.shape[-1], "mlp", "embed", cfg.dtype, "fc2", True, cfg.kernels)(h)


class Block(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""
  cfg: StackConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool = False,
               queries: int | None = None) -> jax.Array:
    """queries: compute only the outputs of the first `queries` positions
    (all positions are still attended): [B, queries, D]. `train` and
    `queries` are positional so that `RematBlock` can keep them static."""
    cfg = self.cfg
    x = constrain(x)
    h = layer_norm(cfg, "ln_attn")(x)
    h = MultiHeadAttention(cfg, name="attn")(h, key_mask, train=train, queries=queries)
    x = x if queries is None else x[:, :queries]
    x = x + dropout(cfg)(h, deterministic=not train)
    h = layer_norm(cfg, "ln_mlp")(x)
    h = Mlp(cfg, name="mlp")(h, train=train)
    x = x + dropout(cfg)(h, deterministic=not train)
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

# config.model.remat_policy: what a rematerialised block keeps for its backward
# pass. 'nothing': only its input (the least memory; the backward recomputes the
# whole block, about a third more FLOPs). 'dots': also the outputs of its
# dense products (q, k, v, the attention output's projection, fc1, fc2: ~9
# [B, L, D]-sized arrays), so the backward recomputes only the attention core
# and the elementwise ops (a few percent more FLOPs) and drops the [B, H, L, L]
# probabilities and the MLP's activations.
REMAT_POLICIES = {"nothing": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _remat_policy(name: str):
  if name not in REMAT_POLICIES:
    if name == "none":
      raise ValueError("config.model.remat_policy='none': turn remat off with model.remat=False "
                       "('none' is for model.remat_small_policy)")
    raise ValueError(f"config.model.remat_policy={name!r}: expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


@functools.lru_cache(maxsize=None)
def _remat_block_class(policy: str):
  """Block rematerialised with `policy` (RematBlock for 'nothing')."""
  if policy == "nothing":
    return RematBlock
  return nn.remat(Block, static_argnums=(3, 4), policy=_remat_policy(policy))


def remat_slices(rows: int, max_rows: int) -> int:
  """How many slices `_sliced_remat_call` cuts `rows` sequences into: the
  fewest that divide them with at most `max_rows` rows each."""
  return next(k for k in range(1, rows + 1) if rows % k == 0 and rows // k <= max_rows)


def _sliced_remat_call(block: Block, max_rows: int, policy: str, x: jax.Array,
                       key_mask: jax.Array, train: bool, queries: int | None) -> jax.Array:
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

  scan = nn.scan(nn.remat(step, policy=_remat_policy(policy)), variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1, length=k)
  _, y = scan(block, None, x.reshape(n // k, k, *x.shape[1:]),
              key_mask.reshape(n // k, k, *key_mask.shape[1:]))
  return y.reshape(n, *y.shape[2:])


def make_block(cfg: StackConfig, name: str) -> nn.Module:
  """An Encoder's block: RematBlock for whole-batch remat, else a Block
  (with `remat_rows` `call_block` rematerialises it by slices of the batch)."""
  if cfg.remat and not cfg.remat_rows:
    return _remat_block_class(cfg.remat_policy)(cfg, name=name)
  return Block(cfg, name=name)


def call_block(block: nn.Module, cfg: StackConfig, x: jax.Array, key_mask: jax.Array,
               train: bool, queries: int | None) -> jax.Array:
  if cfg.remat and cfg.remat_rows:
    return _sliced_remat_call(block, cfg.remat_rows, cfg.remat_policy, x, key_mask, train, queries)
  return block(x, key_mask, train, queries)


class _ScannedBlock(nn.Module):
  """One step of `nn.scan` over an Encoder's blocks: (x, key_mask) -> (x, None)."""
  cfg: StackConfig
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array):
    block = make_block(self.cfg, "block")
    return call_block(block, self.cfg, x, key_mask, self.train, None), None


class Encoder(nn.Module):
  """`layers` pre-LN blocks and a final LayerNorm; `cfg.remat` recomputes each
  block in the backward pass (config.model.remat; same parameters, values and
  gradients), by slices of at most `cfg.remat_rows` sequences of the batch,
  one after another, when that is set (config.model.remat_rows: one slice's
  activations at a time; see `_sliced_remat_call`), keeping what
  `cfg.remat_policy` says (REMAT_POLICIES). A call on at most
  `cfg.remat_small_rows` sequences uses `cfg.remat_small_policy` instead
  ('none': not recomputed at all): a small batch can afford to keep more.

  `cfg.scan` (config.model.scan_layers) runs the blocks as one `nn.scan` over
  parameters stacked on a leading 'layers' axis (params `blocks/block/...`
  [layers, ...] instead of `block0` .. `block{n-1}`): XLA compiles one block
  per stack instead of every layer (configs/scale_authors.py's train step:
  35 s instead of 79 s), and with `remat` the loop forces the backward pass to
  recompute and free one block at a time, whatever the backend's scheduler
  does (XLA:CPU's otherwise hoists the recomputation; see RematBlock). The
  values are those of the unrolled stack (dropout masks differ)."""
  layers: int
  cfg: StackConfig

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
    cfg = self.cfg
    if cfg.remat and x.shape[0] <= cfg.remat_small_rows:  # A small call: a cheaper remat, or none.
      small = cfg.remat_small_policy
      cfg = dataclasses.replace(cfg, remat=small != "none", remat_policy=small, remat_rows=0)
    x = x.astype(cfg.dtype)
    scanned = cfg.scan and self.layers > 0
    # With dropout in training the CLS-only last block would draw other masks;
    # scanned, the last block is inside the loop: every position is computed.
    dropping = train and (cfg.dropout > 0.0 or cfg.attention_dropout > 0.0)
    exact_split = split is not None and self.layers > 0 and not scanned and not dropping
    ln_final = layer_norm(cfg, "ln_final")
    if scanned:
      x = self._scanned_blocks(cfg, x, key_mask, train=train)
    else:
      blocks = [make_block(cfg, f"block{i}") for i in range(self.layers)]
      for block in blocks[:-1] if exact_split else blocks:
        x = call_block(block, cfg, x, key_mask, train, None)
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
      full = call_block(blocks[-1], cfg, rows(x, 0, n_full), rows(key_mask, 0, n_full), train, None)
      full = constrain(ln_final(full)).reshape(n // group, n_full, length, d)
    cls = call_block(blocks[-1], cfg, rows(x, n_full, group), rows(key_mask, n_full, group), train, 1)
    cls = constrain(ln_final(cls)).reshape(n // group, group - n_full, d)
    return full, cls

  def _scanned_blocks(self, cfg: StackConfig, x: jax.Array, key_mask: jax.Array, *,
                      train: bool) -> jax.Array:
    """All the blocks as one `nn.scan` over their stacked parameters."""
    stack = nn.scan(
        _ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast, length=self.layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, train, name="blocks")
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
