"""Ablation arm: the baseline with a classification head, weight 0.3 (the previous default's weight)."""
base = "configs/ablation/base.py"
head = True
head_weight = 0.3
