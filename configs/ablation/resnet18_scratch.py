"""Ablation arm: ResNet18 from scratch (the original recipe's encoder, no pretrained weights)."""
base = "configs/ablation/base.py"
encoder = "resnet18"
encoder_weights = ""
