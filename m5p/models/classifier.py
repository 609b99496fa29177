"""The authors' classification model: the SCALE backbone plus an MLP head.

    logits = Classifier(config, num_classes).apply(params, batch, train=False)["logits"]

Head (SCALE.md section 6, task 3, as in the authors' code): the five pooled
modality vectors of the joint co-transformer concatenated ([B, 5 * W]; an
absent modality's vector is exactly zero, as ScaleModel guarantees) ->
Linear(config.classify.hidden) -> dropout(config.classify.dropout) ->
Linear(num_classes). No activation between the two linears: the authors'
head has none.

Params: {'backbone': <ScaleModel params>, 'head_hidden': ..., 'head_out': ...},
so an export's params drop in as params['backbone'] (m5p.state.init_from_export).

Outputs: logits [B, C] float32, plus the backbone's `present`, `pooled` and
`fused` (for inspection; the loss reads `logits` only).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m5p.models import layers
from m5p.models.scale import ScaleModel

BACKBONE = "backbone"  # Name of the ScaleModel submodule (and params subtree).


class Classifier(nn.Module):
  config: ml_collections.ConfigDict
  num_classes: int

  def setup(self):
    cc = self.config.classify
    if self.num_classes < 2:
      raise ValueError(f"Classifier: num_classes={self.num_classes}; expected >= 2 "
                       "(config.classify.num_classes, or the dataset manifest's num_categories).")
    self.backbone = ScaleModel(self.config)
    # Kernels (embed, mlp) and (mlp, None): FSDP shards the 5W input rows, the
    # model axis the hidden units, like a transformer MLP.
    self.head_hidden = layers.dense(int(cc.hidden), "embed", "mlp", jnp.float32)
    self.head_dropout = nn.Dropout(float(cc.dropout))
    self.head_out = layers.dense(self.num_classes, "mlp", None, jnp.float32)

  def __call__(self, batch: dict, *, train: bool) -> dict:
    out = self.backbone(batch, train=train)
    pooled = out["pooled"]  # [B, 5, W]; absent modalities are zero.
    x = pooled.reshape(pooled.shape[0], -1).astype(jnp.float32)
    h = self.head_dropout(self.head_hidden(x), deterministic=not train)
    logits = nn.with_logical_constraint(self.head_out(h), ("batch", None))
    return {"logits": logits.astype(jnp.float32), "present": out["present"], "pooled": pooled,
            "fused": out["fused"]}


def backbone_params(params: dict) -> dict:
  """The ScaleModel params inside a Classifier's params."""
  return params[BACKBONE]


def scale_backbone_updates(updates: dict, step: jax.Array,
                           config: ml_collections.ConfigDict) -> dict:
  """The optimizer's updates with the backbone's scaled: 0 during the head-only
  warm-up (`freeze_backbone_steps`), `backbone_lr_mult` after. Scaling the
  AdamW update (weight decay included) is a per-group learning rate."""
  cc = config.classify
  mult = jnp.where(step < int(cc.freeze_backbone_steps), 0.0, float(cc.backbone_lr_mult))
  scaled = jax.tree.map(lambda u: (u * mult).astype(u.dtype), updates[BACKBONE])
  return {**updates, BACKBONE: scaled}
