"""Ablation arm: one class-agnostic lesion channel with the label from the head (weight 0.1), instead of the per-class benign/malignant channels (compare with head01)."""
base = "configs/ablation/head01.py"
class_agnostic = True
