"""Weight-standardized convolution with a learnable gain (Brock et al. 2021).

Normalizer-Free networks replace BatchNorm by standardizing the *weights*:
each output channel's kernel is shifted to zero mean and scaled to variance
1/fan_in before the convolution, so a unit-variance input gives a unit-variance
output at initialization. A learnable per-channel gain restores the
expressivity that the standardization removes. Nothing depends on the batch,
so per-example gradients stay per-example (unlike BatchNorm, which mixes
examples and breaks the DP-SGD guarantee).
"""

import keras
from keras import ops

from tan_keras import _validate


@keras.utils.register_keras_serializable(package="tan_keras")
class WSConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel is standardized per output channel at every call.

    The convolution uses `gain * (kernel - mean) / sqrt(max(var * fan_in, eps))`
    where mean and var are taken over (height, width, input channels) of each
    output channel and fan_in = height * width * input channels / groups.

    Args:
      filters: Number of output channels.
      kernel_size: As for `keras.layers.Conv2D`.
      eps: Floor on `var * fan_in`; keeps a constant kernel from dividing by
        zero.
      gain_initializer: Initializer of the per-channel gain (ones by default,
        which makes the layer variance preserving at initialization).
      **kwargs: Any other `keras.layers.Conv2D` argument. The default
        `kernel_initializer` is a fan-in normal; after standardization only its
        shape matters, not its scale.

    Raises:
      ValueError: if `eps` is not a float > 0.
    """

    def __init__(self, filters, kernel_size, eps=1e-4, gain_initializer="ones", **kwargs):
        kwargs.setdefault(
            "kernel_initializer",
            keras.initializers.VarianceScaling(1.0, "fan_in", "normal"),
        )
        super().__init__(filters, kernel_size, **kwargs)
        self.eps = _validate.positive("eps", eps)
        self.gain_initializer = keras.initializers.get(gain_initializer)

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(
            name="gain",
            shape=(self.filters,),
            initializer=self.gain_initializer,
            trainable=True,
            dtype=self.dtype,
        )

    def standardized_kernel(self, kernel=None):
        """Returns the kernel the convolution actually uses.

        Args:
          kernel: Raw kernel to standardize; defaults to `self.kernel`.

        Returns:
          A tensor shaped like the kernel (kh, kw, in / groups, filters).
        """
        kernel = self.kernel if kernel is None else kernel
        fan_in = 1
        for dim in kernel.shape[:-1]:
            fan_in *= int(dim)
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
        scale = ops.rsqrt(ops.maximum(var * fan_in, self.eps))
        return (kernel - mean) * scale * ops.cast(self.gain, kernel.dtype)

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, self.standardized_kernel(kernel))

    # Keras 3's Conv2D saves and loads its kernel and bias only (as entries
    # "0" and "1"); the gain is a trained weight too and goes after them.
    def _gain_key(self) -> str:
        return str(2 if self.use_bias else 1)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built:
            store[self._gain_key()] = self.gain

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.gain.assign(store[self._gain_key()])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "eps": self.eps,
                "gain_initializer": keras.initializers.serialize(self.gain_initializer),
            }
        )
        return config
