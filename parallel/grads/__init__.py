"""Gradient communication: parameter groups, reduction, buckets, ZeRO-sharded AdamW, sync strategies."""
