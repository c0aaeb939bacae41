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
