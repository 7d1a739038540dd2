"""The `make demo` recipe: a model that visibly learned on synthetic phantoms in about five minutes on 2 CPU cores.

EfficientNet-Lite0 with its ImageNet weights (they install with pip: no download), 128 px, fp32 (no bf16: most
CPUs have no AMX), BCE + soft Dice per lesion channel (the demo is judged by the per-class lesion Dice, so each
class's channel is trained to outline its own lesions), AdamW one-cycle. The phantoms' folder and the run's
folder are given on the command line (Makefile, target demo).
"""
encoder = "efficientnet-lite0"
encoder_weights = "imagenet"
image_size = 128
loss = "bce+dice"
head = False
augment = "recipe"
optimizer = "adamw"
lr = 0.002
weight_decay = 0.01
lr_schedule = "onecycle"
batch_size = 8
epochs = 6
expand = 3
cpu_bf16 = False
seed = 42
