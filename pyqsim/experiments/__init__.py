"""Reproductions of the papers' tables on the bundled models (RepQ-ViT ablation, Q-Diffusion table)."""
