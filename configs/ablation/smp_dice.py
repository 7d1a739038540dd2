"""Ablation arm: SMP's per-channel multilabel soft Dice instead of the Dice of the union of the lesion channels."""
base = "configs/ablation/base.py"
loss = "bce+dice"
