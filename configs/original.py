"""The original recipe (the seed repository's): plain `python train.py` trains exactly this.

ResNet18-UNet without pretrained weights, 256x256 grey input normalized with mean 0.5 / std 0.5, the training
set expanded 7x by augmentation, RMSProp lr 1e-3, pixel-wise binary cross-entropy, ReduceLROnPlateau (x0.1
after 5 epochs without a lower validation loss), 200 epochs. Variants: encoder = "resnet50" / "densenet121",
encoder_weights = "imagenet", init_from = <a checkpoint> ("retrained from previous weights")."""
data_dir = 'data/BUSI'
val_fraction = 0.2
seed = 42
encoder = 'resnet18'
encoder_weights = ''
init_from = ''
image_size = 256
epochs = 200
batch_size = 8
lr = 0.001
optimizer = 'rmsprop'
weight_decay = 0.0
lr_factor = 0.1
lr_patience = 5
lr_schedule = 'plateau'
expand = 7
augment = 'recipe'
loss = 'bce'
head = False
threshold = 0.5
