"""Ablation arm: input 160 px instead of 128 (same draws: costs more per draw)."""
base = "configs/ablation/base.py"
image_size = 160
