"""Optimizer: which leaves AdamW decays, for every shipped config, scanned or not."""
import jax
import pytest
from flax.core import meta

from m5p import optim
from m5p.config_loader import apply_overrides, load_config
from m5p.models.scale import ScaleModel, init_batch

# Fewer blocks than the configs ship (names do not depend on the count);
# every stack keeps two, so the unrolled trees hold block0 and block1.
TWO_BLOCKS = {f"model.{k}_layers": 2 for k in ("text", "image", "video", "audio", "fusion")}


def _param_paths(config_name: str, scan: bool) -> dict[str, tuple]:
  c = apply_overrides(load_config(config_name), dict(TWO_BLOCKS, **{"model.scan_layers": scan}))
  shapes = jax.eval_shape(lambda r: ScaleModel(c).init({"params": r, "dropout": r}, init_batch(c, 1),
                                                       train=False)["params"], jax.random.key(0))
  shapes = meta.unbox(shapes)
  mask = optim.decay_mask(shapes)
  return {jax.tree_util.keystr(p): (s.shape, m) for (p, s), m in
          zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(mask))}


@pytest.mark.parametrize("config_name", ["demo", "scale_base", "scale_authors"])
@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_applies_to_kernels_and_embeddings_only(config_name, scan):
  leaves = _param_paths(config_name, scan)
  decayed = sorted(p for p, (_, d) in leaves.items() if d)
  kept = sorted(p for p, (_, d) in leaves.items() if not d)
  print(f"{config_name} scan={scan}: {len(decayed)} of {len(leaves)} leaves decay:")
  for p in decayed:
    print(f"  decay  {p} {leaves[p][0]}")
  for p in kept:
    print(f"  keep   {p} {leaves[p][0]}")
  name = lambda p: p.rsplit("'", 2)[-2]
  assert decayed and all(name(p) in ("kernel", "embedding") for p in decayed)
  assert all(name(p) not in ("kernel", "embedding") for p in kept)
  assert {name(p) for p in kept} <= {"bias", "scale", "lm_bias", "log_inv_temperature"}
  # The leaves a rank test would wrongly decay are all kept: the q/k/v biases
  # (heads, head_dim), and under scan_layers every stacked bias and norm.
  multi_dim_kept = [p for p in kept if len(leaves[p][0]) >= 2]
  assert any("['query']['bias']" in p for p in multi_dim_kept)
  if scan:
    assert any("['ln_attn']['scale']" in p for p in multi_dim_kept)
    assert any("['fc1']['bias']" in p for p in multi_dim_kept)
