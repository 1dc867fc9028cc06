"""Model and tokenizer building, packing, the training loop, checkpoints."""
