"""Transfer and evaluation as PyTorch FLAIR does them: zero-shot with expert
knowledge, linear probe, CLIP-Adapter / Tip-Adapter(-f), per-class shot
splits and FLAIR's metrics. ``flair_jax.evaluation.run`` ties them together;
``python -m flair_jax.evaluate`` is its command line.
"""
