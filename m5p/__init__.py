"""m5p: five-modality product representation learning (SCALE on M5Product) in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
  """`m5p.Encoder` on first use: `import m5p` stays light (no jax, no tfds)."""
  if name == "Encoder":
    from m5p.encoder import Encoder
    return Encoder
  raise AttributeError(f"module 'm5p' has no attribute {name!r}")
