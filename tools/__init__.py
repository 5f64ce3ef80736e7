"""Offline single-process tools: HF import/export, upcycling, pruning, merging, inspection, evaluation."""
