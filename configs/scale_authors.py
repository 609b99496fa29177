"""SCALE as the authors ran it: their method choices, at their sizes and input shapes.

For like-for-like comparisons with the paper and with m5p's own decisions
(SCALE.md sections 2-5):
  method     text/table share one stack, video reuses the image stack,
             missing modalities zero-filled and attended ('zeros'), SimCLR
             NT-Xent pairs ('ntxent'), fixed tau 0.07, the pair logits of
             each sample scaled by its G_b[i, j] ('per_sample_logits'), no
             catalogue-aware positives, no modality dropout;
  recipe     batch 64, Adam(W) lr 1e-4, 10% warmup then linear decay,
             weight decay 0.01, dropout 0.1;
  inputs     precomputed features through 'features' stems at the released
             shapes: 36 image regions x 2048, 12 video (S3D) seconds x 1024,
             80 audio mel-bin tokens x 751 frames; title 36 and table 64
             tokens over a 21,128-token vocabulary (bert-base-chinese's size);
  model      width 768, 12 heads, 6 layers per unimodal stack, 6 JCT layers,
             projection to 1024; the video's S3D features run through the
             image stack's blocks, as the authors' do (197M parameters).
m5p differences that remain: SentencePiece instead of WordPiece (same
vocabulary size); a learned [CLS] instead of the prepended mean token.

  python -m m5p.main --config=configs/scale_authors.py --workdir=W --config.data.dir=DATA
  python -m m5p.main --config=configs/scale_authors.py:demo --workdir=W   # the method at demo size

Variant 'demo': the demo (configs/demo.py) with the authors' method choices
(AUTHORS_METHOD) and media stems: what tools/ablate.py compares m5p's
decisions against.
"""
import os

# The authors' method choices (everything but sizes and the optimisation budget).
AUTHORS_METHOD = {
    "model.share_text_table": True,
    "model.video_uses_image_stack": True,
    "model.missing": "zeros",
    "loss.infonce": "ntxent",
    "loss.harmonization": "per_sample_logits",
    "loss.temperature": 0.07,
    "loss.learn_temperature": False,
    "loss.multi_positive": False,
}


def get_config(variant: str = ""):
  from m5p.config_loader import apply_overrides, load_config  # pylint: disable=import-outside-toplevel
  here = os.path.dirname(os.path.abspath(__file__))
  if variant == "demo":
    c = apply_overrides(load_config(os.path.join(here, "demo.py")), AUTHORS_METHOD)
    for m in c.data.modality_dropout:
      c.data.modality_dropout[m] = 0.0
    return c
  if variant:
    raise ValueError(f"configs/scale_authors.py: unknown variant {variant!r} (only 'demo')")
  # scale_base's sizes and recipe (batch 64, lr 1e-4, linear decay) ...
  c = apply_overrides(load_config(os.path.join(here, "scale_base.py")), AUTHORS_METHOD)
  c.optim.warmup_frac = 0.1
  c.optim.weight_decay = 0.01
  c.data.text_len = 36  # ... with the authors' inputs.
  c.data.table_len = 64
  c.data.vocab_size = 21128
  # MLM / MEM pick slots, 27 in all (the LM head's logits are [batch, 27,
  # 21128]): a full 36-token title at 15% overflows 11 slots for 0.1% of its
  # picks, and 64 table tokens picked one by one would overflow 16 for 0.2%
  # (MEM's whole keys and values vary more: watch lm_dropped/table).
  c.loss.max_predictions.text = 11
  c.loss.max_predictions.table = 16
  c.data.features.image = (36, 2048)
  c.data.features.video = (12, 1024)
  c.data.features.audio = (80, 751)
  for m in ("image", "video", "audio"):
    c.model.stem[m] = "features"
  # Each stack one scanned block, recomputed in the backward pass by slices of
  # at most 8 sequences, and XLA:CPU's memory-optimised scheduler (its default
  # allocates every stack's gradient buffer before the forward pass): batch 64
  # then peaks at ~5.0 GiB of host memory instead of ~17 GiB without remat
  # (README, "configs/scale_authors.py against the authors").
  c.model.scan_layers = True
  c.model.remat = True
  c.model.remat_rows = 8  # 16 until the LM loss left the model: 0.2 GiB more at batch 64.
  # ... but a batch of at most 8 keeps its blocks' dense outputs and recomputes
  # only the attention core and elementwise ops (batch 8 on a 2-core EPYC: 7.4 s
  # a step in 4.3 GiB, against 9.0 s with full remat and 7.4 s in 5.9 GiB
  # without remat).
  c.model.remat_small_rows = 8
  c.model.remat_small_policy = "dots"
  c.compiler_options = "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
  return c
