"""Layer 5, the defense kit: what the defense/ scripts share (options, loading, evaluation, outputs,
fine-tuning, BatchNorm masks, the retuning check). Independent of the attack kit."""
