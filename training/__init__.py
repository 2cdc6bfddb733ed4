"""Synthetic visual QA, the training recipe, evaluation and the small shipped checkpoints."""
