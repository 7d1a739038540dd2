"""Ablation arm: size160 with a classification head of weight 0.1 (the label and the gate from the head, at the best input size)."""
base = "configs/ablation/size160.py"
head = True
head_weight = 0.1
