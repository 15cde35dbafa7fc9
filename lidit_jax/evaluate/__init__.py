"""Prompt-following evaluation: the shapes scorer, probes, benchmark folders, the ablation."""
