"""Ablation arm: pixel-wise BCE alone (the original recipe's loss), no Dice term."""
base = "configs/ablation/base.py"
loss = "bce"
