"""Ablation arm: the original recipe's augmentation ranges instead of the scanner preset."""
base = "configs/ablation/base.py"
augment = "recipe"
