"""The demo: a tiny SCALE on a generated synthetic M5Product, minutes on a laptop CPU.

python -m m5p.main --config=configs/demo.py --workdir=/tmp/m5p_demo
"""
from m5p import default_config


def get_config():
  c = default_config.get_config()
  c.total_steps = 400
  c.batch_size = 64
  c.log_every = 20
  c.ckpt_every = 100
  c.optim.lr = 2e-3
  return c
