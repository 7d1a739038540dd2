"""Ablation arm: the baseline with a classification head, weight 0.1 (the label from the head; the gate becomes possible)."""
base = "configs/ablation/base.py"
head = True
head_weight = 0.1
