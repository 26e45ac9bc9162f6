"""The config shared by every recipe; recipes override fields of it."""

import ml_collections



# PyTorch FLAIR's default pre-training datasets (main_pretrain.py).
FLAIR_PRETRAINING_DATASETS = (
    '01_EYEPACS', '03_IDRID', '04_RFMid', '05_1000x39', '06_DEN', '07_LAG', '08_ODIR',
    '09_PAPILA', '10_PARAGUAY', '11_STARE', '12_ARIA', '14_AGAR300', '15_APTOS',
    '16_FUND-OCT', '17_DiaRetDB1', '18_DRIONS-DB', '19_Drishti-GS1', '20_E-ophta',
    '21_G1020', '23_HRF', '24_ORIGA', '26_ROC', '27_BRSET', '28_OIA-DDR', '29_AIROGS',
    '30_SUSTech-SYSU', '31_JICHI', '32_CHAKSU', '33_DR1-2', '34_Cataract', '35_ScarDat')


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with FLAIR's paper values."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'fundus_synthetic' is built in the workdir when absent; 'fundus_assembly'
  # (or any builder with the shared schema) must be built beforehand with
  # `python -m data_pipelines build fundus_assembly ...`.
  c.data.name = 'fundus_assembly'
  c.data.path = ''  # a built dataset folder (.../<builder>/<config>/<version>)
  c.data.build = ml_collections.ConfigDict()  # builder options when built here
  # Datasets the built set must hold (FLAIR's pre-training list); any other
  # dataset in it stops the run (e.g. a transfer set that would leak into
  # pre-training); missing ones are reported. () accepts whatever was built.
  c.data.datasets = FLAIR_PRETRAINING_DATASETS
  c.data.sampling = 'balanced'  # FLAIR's: dataset uniformly, then an image
  c.data.epoch_length = 0  # 0: the number of pre-training images
  # The run's expert-knowledge dictionary ('flair_repo', 'seed' or a JSON path),
  # in the training captions and in the zero-shot prompts of eval.domain_knowledge;
  # '' for none in either.
  c.data.knowledge = 'flair_repo'
  c.data.worker_count = 0
  c.data.read_threads = 2

  c.model = ml_collections.ConfigDict()
  # Text tower: a Hugging Face BERT id or local folder (weights + tokenizer),
  # or '' to train from scratch with a WordPiece vocabulary built from the
  # captions (needs model.bert for its shape).
  c.model.bert_type = 'emilyalsentzer/Bio_ClinicalBERT'
  c.model.bert = ml_collections.ConfigDict()  # shape overrides when bert_type is ''
  c.model.vision = 'resnet'  # image tower: 'resnet' or 'vit'
  c.model.resnet_stages = (3, 4, 6, 3)
  c.model.resnet_width = 64
  # The ViT's shape (ViT-B/16); the canvas is resized to vit.image_size on
  # the device. remat: rematerialise each block in the backward pass.
  c.model.vit = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, embed_dim=768, depth=12, heads=12, mlp_ratio=4.0,
      pool='token', remat=False))
  # The image tower's own PyTorch weights: torchvision ResNet-50 (IMAGENET1K_V2)
  # or a timm ViT state dict (.pth or .safetensors). resnet_weights is the
  # older name of the same setting.
  c.model.vision_weights = ''
  c.model.resnet_weights = ''
  # Normalisation of the [0, 1] input inside the tower: '' the tower's usual
  # weights' (ResNet: none, as FLAIR; ViT: 'inception', timm's augreg 0.5/0.5),
  # or 'none', 'inception', 'imagenet'.
  c.model.vision_norm = ''
  c.model.proj_dim = 512
  c.model.text_pooling = 'flair'
  c.model.image_size = 512

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global
  c.train.epochs = 15
  c.train.lr = 1e-4
  c.train.weight_decay = 1e-5
  c.train.warmup_epochs = 1
  c.train.schedule = 'flair'  # FLAIR's 100-epoch cosine horizon; or 'cosine'
  c.train.horizon_epochs = 100
  c.train.clip_norm = 1.0
  c.train.compute_dtype = 'auto'  # bfloat16 on accelerators, float32 on CPU
  c.train.augment = True
  c.train.text_dropout = True
  # Rematerialise each block (ResNet bottleneck, BERT layer, ViT block) in
  # the backward pass: +23% FLOPs (ResNet-50 + BERT-base); on XLA:CPU the
  # memory plan did not shrink (benchmarks/README.md), accelerators unmeasured.
  c.train.remat = False
  # Token ids go to the device cut to the smallest of these widths holding
  # the batch's longest caption (else the full 77): one compiled step per
  # width; FLAIR's pooling gives the same numbers at any width. () : always 77.
  c.train.text_buckets = (16, 24, 32, 48, 64)
  # Micro-batches per step: the gradient of the whole batch's loss (every row
  # scored against the whole batch) with 1/K of the towers' activations held
  # for the backward pass; see flair_jax/training/step.py for BatchNorm.
  c.train.accumulation_steps = 1
  # Parameters left out of the optimiser (regexes over '/'-joined paths);
  # the BERT pooler gets no gradient in PyTorch FLAIR, so it is not updated.
  c.train.frozen = ('text_model/pooler/.*',)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # 0: once per epoch
  c.checkpoint.keep = 3

  c.log_every_steps = 50
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0: at the end only
  # Zero-shot sets: 'synthetic' (the built synthetic test split) or built
  # fundus_classification folders.
  c.eval.sets = ()
  c.eval.domain_knowledge = True
  c.eval.batch_size = 64

  c.export_torch = False  # write a PyTorch FLAIR folder at the end
  c.plots = True

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # jax.distributed.initialize() on every host
  # Unset (''/0/-1) on TPU pods and SLURM, where JAX detects them.
  c.distributed.coordinator_address = ''  # host0:port
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c
