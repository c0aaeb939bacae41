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
