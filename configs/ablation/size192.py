"""Ablation arm: input 192 px instead of 128."""
base = "configs/ablation/base.py"
image_size = 192
