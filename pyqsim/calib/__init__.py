"""Post-training calibration (RepQ-ViT, Q-Diffusion); needs PyTorch."""
