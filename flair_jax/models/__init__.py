"""Flax NNX modules: torchvision-exact ResNet, Hugging Face-exact BERT, FLAIR."""

from flair_jax.models.bert import Bert, BertConfig
from flair_jax.models.flair import (FLAIR, LOGIT_SCALE_MAX, clamp_logit_scale,
                                    flair_text_pool, l2_normalize)
from flair_jax.models.resnet import RESNET50_STAGES, ResNet

__all__ = ['Bert', 'BertConfig', 'FLAIR', 'LOGIT_SCALE_MAX', 'RESNET50_STAGES',
           'ResNet', 'clamp_logit_scale', 'flair_text_pool', 'l2_normalize']
