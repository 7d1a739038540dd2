"""Ablation arm: MobileNetV2 (ImageNet) encoder instead of EfficientNet-Lite0."""
base = "configs/ablation/base.py"
encoder = "mobilenet_v2"
