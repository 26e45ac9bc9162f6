"""flair_jax: FLAIR pre-training in JAX/Flax NNX with PyTorch FLAIR interop."""

_LAZY = {'FLAIRModel': 'flair_jax.inference'}


def __getattr__(name):
  # Lazy so that ``import flair_jax`` does not import JAX and the towers.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
