"""The demo: a tiny SCALE on a generated synthetic M5Product, minutes on a laptop CPU.

python -m m5p.main --config=configs/demo.py --workdir=/tmp/m5p_demo
python -m m5p.main --config=configs/demo.py:tiny --workdir=/tmp/m5p_smoke   # seconds: a smoke test
"""
from m5p import default_config


def get_config(variant: str = ""):
  c = default_config.get_config()
  c.total_steps = 300
  c.batch_size = 64
  c.log_every = 20
  c.ckpt_every = 100
  c.optim.lr = 2e-3
  if variant == "tiny":  # What the tests train: small data, a smaller model, a few steps.
    c.batch_size = 16
    c.total_steps = 6
    c.log_every = 1
    c.ckpt_every = 3
    c.async_checkpointing = False
    c.data.read_threads = 1
    c.eval.batch_size = 32
    c.eval.report = False  # Tested on its own (tests/test_report.py, test_export.py).
    c.data.vocab_size = 600
    c.data.synthetic_products = 160
    c.model.update(dict(width=32, heads=2, text_layers=1, image_layers=1, video_layers=1,
                        audio_layers=1, fusion_layers=1, proj_dim=32))
  elif variant:
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (only 'tiny')")
  return c
