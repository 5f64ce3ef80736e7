"""Data: token corpora and their batches, tokenizers, instruction-tuning conversations."""
