"""The augmentation policies by name, and each dataset's; no TensorFlow.

The names are checked when the program's flags are, before TensorFlow loads
(`tan_keras.data.augment.make_augmenter` builds them).
"""

POLICIES = ("none", "digits", "cifar", "imagenet")

# The policy of each dataset when --augment is not given.
DEFAULT_POLICY = {
    "digits": "digits",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "imagenet2012": "imagenet",
}

# Each padding policy's (pixels on each side, mode) before its random crop:
# digits are translated by a pixel over zeros; CIFAR and ImageNet images
# are reflect-padded (the TAN recipes).
PADDING = {"digits": (1, "CONSTANT"), "cifar": (4, "REFLECT"), "imagenet": (20, "REFLECT")}

# ImageNet: the shorter side resized to 256, the center 224 x 224 kept.
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224

# The ImageNet policy's colour jitter: torchvision's ColorJitter(0.8, 0.8,
# 0.8, 0.2) applied with probability 0.3 (the TAN recipe).
JITTER_STRENGTH = 0.8
JITTER_HUE = 0.2
JITTER_PROB = 0.3
