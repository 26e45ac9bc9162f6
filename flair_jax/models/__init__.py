"""Flax NNX modules: torchvision-exact ResNet, Hugging Face-exact BERT, the
FLAIR two-tower model; their configs and the factory that builds them."""

from flair_jax.models.bert import Bert, BertConfig
from flair_jax.models.config import DEFAULT_BERT_TYPE, ModelConfig, VisionConfig
from flair_jax.models.factory import build_model
from flair_jax.models.flair import (LOGIT_SCALE_MAX, FLAIRTowers, clamp_logit_scale,
                                    flair_text_pool, l2_normalize)
from flair_jax.models.resnet import RESNET50_STAGES, ResNet

__all__ = ['Bert', 'BertConfig', 'DEFAULT_BERT_TYPE', 'FLAIRTowers', 'LOGIT_SCALE_MAX',
           'ModelConfig', 'RESNET50_STAGES', 'ResNet', 'VisionConfig', 'build_model',
           'clamp_logit_scale', 'flair_text_pool', 'l2_normalize']
