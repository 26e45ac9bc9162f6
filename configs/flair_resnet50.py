"""FLAIR's pre-training recipe: ResNet-50 @512 + Bio_ClinicalBERT.

    python -m flair_jax.train --config configs/flair_resnet50.py \
      --config.data.path=DATA/fundus_assembly/<config>/1.0.0 \
      --config.model.resnet_weights=resnet50-11ad3fa6.pth \
      --config.model.bert_type=/path/to/Bio_ClinicalBERT

Variants: ``:smoke`` compiles the recipe at a small image size on any built
set, for a 2-step check on the CPU.
"""

from configs import common


def get_config(arg: str = ''):
  c = common.base_config()
  c.data.name = 'fundus_assembly'
  c.export_torch = True
  if arg == 'smoke':
    c.data.datasets = ()  # any built set: this variant checks compilation
    c.model.image_size = 64
    c.train.batch_size = 8
    c.data.read_threads = 1
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of flair_resnet50; expected "" or "smoke"')
  return c
