"""Ablation baseline (issue 23): the simple recipe that held up off-domain, at the ablation's short budget.

EfficientNet-Lite0 (ImageNet), 128 px, BCE + soft Dice of the union of the lesion channels, no head, scanner
augmentation, AdamW one-cycle; 5 epochs of 1200 draws (6000 images seen) on every fold, whatever its size.
Each arm in this folder builds on this file and changes one thing. Run: python ablation.py
"""
sources = "busi=data/BUSI;bus-uclm=data/BUS-UCLM/manifest.csv;bus-bra=data/BUS-BRA/manifest.csv"
encoder = "efficientnet-lite0"
encoder_weights = "imagenet"
image_size = 128
loss = "bce+union_dice"
head = False
augment = "scanner"
optimizer = "adamw"
lr = 0.001
weight_decay = 0.01
lr_schedule = "onecycle"
batch_size = 16
epochs = 5
expand = 2
draws_per_epoch = 1200
seed = 42
num_threads = 2
progress = False
