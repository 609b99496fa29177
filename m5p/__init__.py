"""m5p: five-modality product representation learning (SCALE on M5Product) in JAX/Flax."""

__version__ = "0.1.0"
