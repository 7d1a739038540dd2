"""Ablation arm: input 256 px instead of 128 (the original recipe's size)."""
base = "configs/ablation/base.py"
image_size = 256
