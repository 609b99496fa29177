"""Per-device memory and time of the 5-modality contrastive loss: global (GSPMD) vs ring.

Why: the global form under jit holds b_local x B_global logits per pair on every
device; the ring form (m5p.losses.ring) holds b_local x b_local (or b_local x
block_size with --block_size). This compiles loss + gradients for global
batches min_batch, 2 min_batch, ... max_batch on emulated CPU devices, prints
the compiled per-device temp memory (`compiled.memory_analysis()`), its ratio
to the previous (half) batch, and times calls up to --time_max.

  python tools/benchmark_loss.py --max_batch 32768 --time_max 4096
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (the ring size)")
  p.add_argument("--min_batch", type=int, default=1024)
  p.add_argument("--max_batch", type=int, default=65536)
  p.add_argument("--dim", type=int, default=256, help="contrastive embedding dim")
  p.add_argument("--infonce", default="clip", choices=("clip", "ntxent"))
  p.add_argument("--mode", default="per_sample_logits",
                 choices=("per_sample_logits", "pair_loss_weights", "uniform"))
  p.add_argument("--variants", default="global,ring,ring_block",
                 help="comma list of global | ring (b_local x b_local blocks) | ring_block")
  p.add_argument("--block_size", type=int, default=512, help="columns per block for ring_block")
  p.add_argument("--global_max", type=int, default=32768,
                 help="largest batch to compile the global form at (its compile is slow)")
  p.add_argument("--time_max", type=int, default=4096, help="time calls only up to this batch")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--forward_only", action="store_true", help="loss only, no gradients")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax  # After XLA_FLAGS.
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from m5p.losses.contrastive import harmonized_contrastive
  from m5p.losses.ring import ring_harmonized_contrastive
  from m5p.modalities import NUM_MODALITIES
  from m5p.sharding import BATCH_AXES, MESH_AXES

  devices = jax.devices()[:args.devices]
  mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shard = NamedSharding(mesh, P(BATCH_AXES))
  kw = dict(mode=args.mode, infonce=args.infonce, temperature=0.07)
  fns = {
      "global": lambda z, p: harmonized_contrastive(z, p, **kw)[0],
      "ring": lambda z, p: ring_harmonized_contrastive(z, p, **kw)[0],
      "ring_block": lambda z, p: ring_harmonized_contrastive(z, p, block_size=args.block_size, **kw)[0],
  }
  variants = [v for v in args.variants.split(",") if v]
  print(f"{len(devices)} x {devices[0].device_kind} devices, mesh {dict(mesh.shape)}, M={NUM_MODALITIES}, "
        f"dim={args.dim}, {args.infonce}/{args.mode}, {'loss' if args.forward_only else 'loss+grad'}, "
        f"block_size={args.block_size} for ring_block")
  print(f"{'B_global':>8} {'b_local':>7} {'variant':>10} {'temp MiB/dev':>12} {'x prev':>6} "
        f"{'compile s':>9} {'ms/call':>9}")
  prev: dict[str, float] = {}
  b = args.min_batch
  while b <= args.max_batch:
    z_spec = jax.ShapeDtypeStruct((b, NUM_MODALITIES, args.dim), jnp.float32, sharding=shard)
    p_spec = jax.ShapeDtypeStruct((b, NUM_MODALITIES), jnp.bool_, sharding=shard)
    inputs = None
    for name in variants:
      if name == "global" and b > args.global_max:
        continue
      fn = fns[name] if args.forward_only else jax.value_and_grad(fns[name])
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(z_spec, p_spec).compile()
      compile_s = time.perf_counter() - t0
      temp = compiled.memory_analysis().temp_size_in_bytes
      ratio = f"{temp / prev[name]:.2f}" if prev.get(name) else "-"
      prev[name] = temp
      ms = "-"
      if b <= args.time_max:
        if inputs is None:
          rng = np.random.default_rng(0)
          z = np.abs(rng.standard_normal((b, NUM_MODALITIES, args.dim))).astype(np.float32)
          inputs = (jax.device_put(z, shard), jax.device_put(rng.random((b, NUM_MODALITIES)) < 0.8, shard))
        jax.block_until_ready(compiled(*inputs))
        t0 = time.perf_counter()
        for _ in range(args.runs):
          jax.block_until_ready(compiled(*inputs))
        ms = f"{(time.perf_counter() - t0) / args.runs * 1e3:.0f}"
      print(f"{b:>8} {b // len(devices):>7} {name:>10} {temp / 2**20:>12.1f} {ratio:>6} "
            f"{compile_s:>9.1f} {ms:>9}", flush=True)
    b *= 2


if __name__ == "__main__":
  main()
