"""Layer 3: batches, the training loop, evaluation and metrics, on models and image sets."""
