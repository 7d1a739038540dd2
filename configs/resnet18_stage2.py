"""The shipped ResNet18-UNet, stage 2 of 3: from stage 1's last weights at 256x256, Adam 1e-4 (9 epochs run of
11 planned). Its checkpoint with the lowest validation loss was the first shipped ResNet18."""
base = "configs/resnet18_stage1.py"
init_from = "runs/resnet18_stage1/last.safetensors"
out_dir = "runs/resnet18_stage2"
image_size = 256
epochs = 9
lr = 0.0001
lr_patience = 2
