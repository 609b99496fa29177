"""Fine-tunes an export as a product classifier (SCALE.md section 6, task 3).

python -m m5p.export --workdir=/tmp/m5p_demo --output_dir=/tmp/m5p_demo_export
python -m m5p.main --config=configs/finetune_cls.py --config.init_from=/tmp/m5p_demo_export \
    --workdir=/tmp/m5p_cls [--config.mesh.data=4 --config.mesh.fsdp=2 ...]

The backbone starts from the export (on any mesh), the authors' head (five
pooled vectors concatenated -> Linear(1024) -> dropout 0.1 -> Linear(classes))
from scratch; both are trained on the `cls_train` items of the train split and
scored on the `cls_test` items of the test split (top-1, top-5, macro-F1 in
W/eval.json's `classification`). The model fields are configs/demo.py's, so
the demo's export fits; for another export set the model fields to its own
(E/config.json): a shape mismatch is refused with the fields that differ.
`:tiny` matches `demo:tiny` (what the tests train).
"""
from m5p.config_loader import load_config


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/finetune_cls.py: unknown variant {variant!r} (only 'tiny')")
  c = load_config("demo:tiny" if variant == "tiny" else "demo")  # The export's model and data shapes.
  c.task = "classify"
  c.init_from = ""  # The export: --config.init_from=E (empty: the backbone starts random).
  c.data.train_list = "cls_train"
  c.classify.eval_list = "cls_test"
  c.loss.mask_prob = 0.0  # Nothing masked: the masked tasks are not trained.
  c.total_steps = 300
  c.batch_size = 64
  c.log_every = 20
  c.ckpt_every = 100
  c.optim.lr = 5e-4
  c.optim.warmup_frac = 0.1
  c.optim.weight_decay = 0.01
  if variant == "tiny":  # Seconds: what tests/test_finetune.py runs.
    c.total_steps = 4
    c.batch_size = 16
    c.log_every = 1
    c.ckpt_every = 2
  return c
