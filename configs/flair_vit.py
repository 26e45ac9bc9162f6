"""FLAIR's pre-training recipe with a ViT-B/16 image tower @224 and
Bio_ClinicalBERT.

    python -m flair_jax.train --config configs/flair_vit.py \
      --config.data.path=DATA/fundus_assembly/<config>/1.0.0 \
      --config.model.vision_weights=vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors \
      --config.model.bert_type=/path/to/Bio_ClinicalBERT

The data keeps FLAIR's 512 canvas; the tower resizes it to 224 (14 x 14
patches of 16) on the device, and normalises it as timm's augreg weights
expect (0.5 / 0.5; ``--config.model.vision_norm=imagenet`` for weights
trained with ImageNet's mean and std). Weights of another image size are
fitted on load (timm's bicubic resampling of the position embedding).

Variants: ``:smoke`` compiles the recipe at a small canvas on any built
set, for a 2-step check on the CPU.
"""

from configs import common


def get_config(arg: str = ''):
  c = common.base_config()
  c.data.name = 'fundus_assembly'
  c.model.vision = 'vit'
  c.model.vit.update(image_size=224, patch_size=16, embed_dim=768, depth=12, heads=12,
                     mlp_ratio=4.0, pool='token')
  c.export_torch = True
  if arg == 'smoke':
    c.data.datasets = ()  # any built set: this variant checks compilation
    c.model.image_size = 64
    c.model.vit.image_size = 32  # 2 x 2 patches: the ViT-B/16 shape, little compute
    c.train.batch_size = 8
    c.data.read_threads = 1
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of flair_vit; expected "" or "smoke"')
  return c
