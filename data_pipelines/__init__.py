"""Input for flair_jax: TFDS builders of fundus datasets, the grain
pre-training pipeline, captions, expert knowledge and tokenization."""
