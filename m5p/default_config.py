"""Every config field m5p reads, with defaults; files in configs/ override a few.

Configs are Python files exposing `get_config()`; they start from
`default_config.get_config()` and change what differs, so a field added here
is available to every config and overridable with `--config.x=y`.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # Global batch, across all processes and devices.
  # Gradient accumulation: the global batch is run as accum_steps micro-batches
  # of batch_size / accum_steps (m5p.accumulation); the contrastive negatives
  # stay the whole global batch, so loss and gradients equal accum_steps=1.
  c.accum_steps = 1
  c.log_every = 10
  c.ckpt_every = 200
  c.eval_every = 0  # 0: evaluate once, at the end.
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  # log_every / ckpt_every = 0: off (only the last step is logged / checkpointed).
  # SIGTERM / SIGINT: the step in flight finishes, is checkpointed, and the run
  # exits with code 75 (m5p.preemption); if that takes longer than this, the
  # process exits anyway (0: no limit).
  c.preempt_grace_s = 120.0
  # What the one training loop (m5p/train.py) trains: 'pretrain' (SCALE's
  # contrastive + masked objective) | 'classify' (fine-tuning backbone + the
  # authors' classification head on `data.train_list`, see `classify` below).
  c.task = "pretrain"
  # An export (`python -m m5p.export --output_dir=E`) whose params start the run
  # ('' = random init): the backbone for 'classify', the whole model for
  # 'pretrain'. Restored onto this run's mesh; a checkpoint in the workdir wins.
  c.init_from = ""

  # Device mesh: sizes of the `data`, `fsdp` and `model` axes; -1 = the rest.
  # num_devices: how many of the visible devices to use (-1: all).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, num_devices=-1))
  # Overrides of the logical-axis rules (m5p.sharding.RULES): (logical axis,
  # mesh axes) pairs, each replacing that axis's rule, e.g.
  # --config.sharding_rules="(('mlp', None), ('embed', 'model'))".
  c.sharding_rules = ()
  # XLA options for compiling the train step, 'name=value[,name=value]' (XLA
  # DebugOptions fields, as jax.jit's compiler_options). Options of another
  # backend are dropped (xla_cpu_* off CPU, xla_gpu_* off GPU), so one config runs
  # everywhere; e.g. 'xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
  # (configs/scale_authors.py) stops XLA:CPU from allocating buffers early.
  c.compiler_options = ""

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # Converted dataset (holds manifest.json). Empty: synthetic default in the workdir.
  c.data.raw_dir = ""  # Raw M5Product layout to convert when `dir` has no dataset yet.
  c.data.train_split = "train"
  c.data.eval_split = "test"
  # Train-time record filters: only records whose `lists` (the dataset's
  # splits/<name>_ids.txt holding the item) include `train_list` ('' = all),
  # and with `train_complete_only`, only records with all five modalities.
  c.data.train_list = ""
  c.data.train_complete_only = False
  c.data.synthetic_products = 1200  # Size of the generated set when no data is configured.
  c.data.synthetic_seed = 0
  c.data.num_shards = 4  # ArrayRecord shards per split written by the converter.
  c.data.worker_count = 0  # Grain worker processes (0: in-process).
  c.data.read_threads = 2  # Threads decoding examples in-process.
  c.data.prefetch = 4  # Batches prefetched.
  # Shapes fixed at batching time.
  c.data.image_size = 32  # Also the resolution the converter stores images and frames at.
  c.data.max_frames = 4  # Video frames (1 fps) kept.
  c.data.audio_frames = 128  # Log-mel frames kept (16 kHz, hop 256: 62.5 frames/s).
  c.data.n_mels = 80
  c.data.max_audio_seconds = 12.0
  c.data.text_len = 32
  c.data.table_len = 48
  c.data.max_fields = 16  # Key/value pairs given a field-index embedding.
  c.data.vocab_size = 2000  # SentencePiece vocabulary trained by the converter.
  # Precomputed features read by `stem='features'` towers (model.stem): (tokens,
  # dim) each item's [N, D] feature is cut or zero-padded to. Defaults: the
  # synthetic generator's; the released M5Product's are in configs/scale_authors.py.
  c.data.features = ml_collections.ConfigDict(dict(image=(5, 64), video=(4, 32), audio=(12, 24)))
  # Modalities read (train and eval); the others are always absent. For
  # modality-addition ablations (tools/ablate.py): ('text', 'image'), ...
  c.data.modalities = ("text", "table", "image", "video", "audio")
  # Train-time modality dropout: each present modality of a training example is
  # dropped (made absent) with its rate, never the last one present, so the
  # model learns to embed any subset of the modalities.
  c.data.modality_dropout = ml_collections.ConfigDict(
      dict(text=0.0, table=0.0, image=0.0, video=0.0, audio=0.0))

  c.model = ml_collections.ConfigDict()
  c.model.width = 64
  c.model.heads = 4
  c.model.mlp_ratio = 4
  c.model.text_layers = 2  # Text and table stack(s).
  c.model.image_layers = 2
  c.model.video_layers = 1  # Temporal layers on top of per-frame image embeddings.
  c.model.audio_layers = 2
  c.model.fusion_layers = 2  # Joint co-transformer.
  c.model.proj_dim = 64  # Contrastive space (authors: 1024).
  c.model.patch_size = 8
  c.model.audio_patch = (32, 16)  # (time frames, mel bins) per audio token.
  c.model.dropout = 0.0  # Hidden states and embeddings.
  # Attention probabilities; None: model.dropout. cuDNN attention
  # (attention_impl='cudnn') has no dropout: set 0 to use it in training.
  c.model.attention_dropout = config_dict.placeholder(float)
  # The transformer's LayerNorm / gelu / dropout / attention (m5p.models.kernels):
  # 'standard' (flax/JAX's ops: what GPUs and TPUs run), 'cpu' (XLA:CPU-tuned
  # versions, same values) or 'auto' (each platform its own, chosen at lowering
  # time, so an export for cpu, cuda and tpu carries both).
  c.model.kernels = "auto"
  # jax.nn.dot_product_attention's implementation on the standard kernels:
  # None (JAX's choice), 'xla', or 'cudnn' (cuDNN flash attention, NVIDIA GPUs).
  c.model.attention_impl = config_dict.placeholder(str)
  c.model.share_text_table = True  # Authors: text and table share one stack.
  c.model.video_uses_image_stack = True  # Authors: video reuses the image stack.
  c.model.missing = "mask"  # 'mask' (m5p) or 'zeros' (authors: zeros fed and attended).
  c.model.dtype = "float32"  # Compute dtype; parameters stay float32.
  # Input stem per non-text modality: 'media' (pixels / frames / log-mel) or
  # 'features' (the precomputed `<modality>_feature` arrays, data.features shapes).
  c.model.stem = ml_collections.ConfigDict(dict(image="media", video="media", audio="media"))
  c.model.remat = False  # Recompute each transformer block in the backward pass (less memory).
  # With remat: recompute each block by slices of at most this many sequences
  # of the global batch, one after another (a block's activations held one
  # slice at a time; same FLOPs). 0: the whole batch at once.
  c.model.remat_rows = 0
  # With remat: what a recomputed block keeps, 'nothing' (its input only) or
  # 'dots' (its dense products' outputs too: more memory, a few percent of
  # recomputation instead of a third; m5p.models.layers.REMAT_POLICIES).
  c.model.remat_policy = "nothing"
  # With remat: stack calls on at most this many sequences (global rows) use
  # `remat_small_policy` instead: 'dots', 'nothing' or 'none' (not recomputed).
  # The step is compiled per batch size, so one config can remat a batch of 64
  # to fit and a batch of 8 only cheaply. 0: no call is small.
  c.model.remat_small_rows = 0
  c.model.remat_small_policy = "dots"
  # Each stack as one nn.scan over blocks with parameters stacked on a 'layers'
  # axis (params blocks/block/... instead of block0..): one compiled block per
  # stack, and with remat a backward pass that frees each block in turn.
  c.model.scan_layers = False

  c.loss = ml_collections.ConfigDict()
  c.loss.harmonization = "per_sample_logits"  # | 'pair_loss_weights' | 'uniform'
  c.loss.infonce = "clip"  # | 'ntxent'
  c.loss.temperature = 0.07  # Fixed, or the initial value when learned.
  # Learned temperature: a log-parameterised scalar, clamped to >= min_temperature (CLIP: 0.01).
  c.loss.learn_temperature = False
  c.loss.min_temperature = 0.01
  # Catalogue-aware positives: listings of the same product (same fine-grained
  # group) in a batch are positives of each other in every pair loss, not negatives.
  c.loss.multi_positive = True
  c.loss.implementation = "global"  # | 'ring' (shard_map ring: b_local x b_local logits per device)
  # Ring only: columns per block (0 = b_local). A fixed block makes per-device
  # memory grow linearly with the global batch instead of with b_local^2.
  c.loss.ring_block_size = 0
  c.loss.contrastive_weight = 1.0
  c.loss.masked_weight = 1.0  # Multiplies each of the five masked-task losses.
  c.loss.mask_prob = 0.15
  # Pick slots per sequence for MLM (text) and MEM (table), BERT's
  # max_predictions_per_seq (at most the sequence length): a sequence with more
  # picks keeps a random `max_predictions` of them and the rest stay unmasked;
  # how many were dropped is logged (`lm_dropped/<seq>`). The LM head runs on
  # these slots only. Defaults: under 0.1% of picks dropped on the synthetic set.
  c.loss.max_predictions = ml_collections.ConfigDict(dict(text=12, table=24))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.1
  c.optim.schedule = "cosine"  # | 'linear'
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.grad_clip = 1.0
  # A step whose loss, gradients or updated state are not finite is never
  # applied (m5p.nonfinite). 'skip': count it and go on, but stop after
  # nonfinite_max_consecutive such steps in a row; 'stop': stop at the first.
  c.optim.nonfinite = "skip"
  c.optim.nonfinite_max_consecutive = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.ks = (1, 5, 10)
  # Also embed this split for the linear probe's `cls_train` items when they
  # are not in the eval split ('' = never: the probe then splits the eval split).
  c.eval.probe_train_split = "train"
  # The 31 x 31 any-modality retrieval matrix at the final evaluation (31 more
  # embedding passes of the eval split; `python -m m5p.evaluate` always does it).
  c.eval.any_modality = False
  # workdir/report.md with its plots (tables, retrieval examples, 2-D map, modality
  # weights) at the final evaluation; `python -m m5p.evaluate` writes it too.
  c.eval.report = True

  # task='classify' (configs/finetune_cls.py): the authors' head on the five
  # pooled vectors (concatenated, absent ones zero) -> Linear(hidden) ->
  # dropout -> Linear(num_classes), trained with softmax cross-entropy.
  c.classify = ml_collections.ConfigDict()
  c.classify.num_classes = 0  # 0: the dataset manifest's num_categories.
  c.classify.hidden = 1024
  c.classify.dropout = 0.1
  c.classify.label_smoothing = 0.0
  # The backbone's updates are scaled by `backbone_lr_mult` (the head's by 1),
  # and are 0 for the first `freeze_backbone_steps` steps (head-only warm-up).
  c.classify.backbone_lr_mult = 1.0
  c.classify.freeze_backbone_steps = 0
  c.classify.eval_list = "cls_test"  # Eval-split items scored ('' or absent list: every labelled item).
  return c
