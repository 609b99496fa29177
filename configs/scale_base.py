"""SCALE at the paper's sizes: width 768, 6 layers per unimodal stack, 6 fusion layers.

Images 224 px (16 px patches), 12 video frames at 1 fps, 12 s of audio as
80-band log-mel; batch 64 and lr 1e-4 with linear decay as the authors
trained. Point `data.dir` at a converted M5Product.
"""
from m5p import default_config


def get_config():
  c = default_config.get_config()
  c.total_steps = 100_000
  c.batch_size = 64
  c.log_every = 50
  c.ckpt_every = 2000
  c.eval_every = 10_000
  c.data.image_size = 224
  c.data.max_frames = 12
  c.data.audio_frames = 752
  c.data.text_len = 40
  c.data.table_len = 64
  c.data.vocab_size = 30000
  # MLM / MEM pick slots: a full 40-token title at 15% overflows 12 slots for
  # 0.08% of its picks and 14 for 0.01% (binomial tail).
  c.loss.max_predictions.text = 14
  c.loss.max_predictions.table = 24
  c.data.num_shards = 256
  c.model.width = 768
  c.model.heads = 12
  c.model.text_layers = 6
  c.model.image_layers = 6
  c.model.video_layers = 6
  c.model.audio_layers = 6
  c.model.fusion_layers = 6
  c.model.proj_dim = 1024
  c.model.patch_size = 16
  c.model.audio_patch = (16, 16)
  c.model.dropout = 0.1
  c.optim.lr = 1e-4
  c.optim.schedule = "linear"
  c.optim.b2 = 0.999
  return c
