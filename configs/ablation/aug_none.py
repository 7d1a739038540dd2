"""Ablation arm: no augmentation (every draw shows the image as it is)."""
base = "configs/ablation/base.py"
augment = "none"
