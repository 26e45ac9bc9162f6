"""flair_jax: FLAIR pre-training in JAX/Flax NNX with PyTorch FLAIR interop."""
