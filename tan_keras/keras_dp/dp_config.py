"""The DP hyper-parameters of a training run, validated once, in one place."""

import dataclasses

from tan_keras import _validate
from tan_keras.privacy import tan

SAMPLING_MODES = ("poisson", "shuffled")


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD hyper-parameters; derived values are properties, never stored twice.

    Attributes:
      l2_norm_clip: C, the L2 norm each example's (view-averaged) gradient is
        clipped to. Must be > 0.
      noise_multiplier: sigma; the noise on the SUM of clipped gradients has
        standard deviation sigma * C. 0 disables noise (not private).
      expected_batch_size: B, the expected size of a Poisson-sampled logical
        batch. The noisy sum is divided by this public constant, never by the
        realized batch size, which is data-dependent.
      dataset_size: N, the number of DISTINCT training examples (before any
        repeat or augmentation); q = B / N.
      augmult: K, the number of augmented views per example. Views of one
        example are one privacy unit: q and N never depend on K.
      sampling: How batches are drawn, which decides the accounting.
        "poisson" (default): each example independently with probability q
        at every step (tan_keras.mechanism.sampling), accounted with amplification by
        sampling. "shuffled": fixed-size batches that partition the data
        once per pass (`fit(x, y, batch_size=B)`), accounted WITHOUT
        amplification: each pass is one Gaussian mechanism in which a
        replaced example moves one batch's sum by at most 2C
        (replace-one adjacency), so epsilon grows with the number of passes.
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: int
    dataset_size: int
    augmult: int = 1
    sampling: str = "poisson"

    def __post_init__(self):
        # Normalise types while validating, so a config built from flags or
        # numpy scalars behaves the same as one built from Python literals.
        set_ = object.__setattr__
        set_(self, "l2_norm_clip", _validate.positive("l2_norm_clip", self.l2_norm_clip))
        set_(
            self,
            "noise_multiplier",
            _validate.non_negative("noise_multiplier", self.noise_multiplier),
        )
        set_(
            self,
            "dataset_size",
            _validate.positive_int("dataset_size", self.dataset_size),
        )
        set_(
            self,
            "expected_batch_size",
            _validate.integer(
                "expected_batch_size",
                self.expected_batch_size,
                low=1,
                high=self.dataset_size,
                hint="The expected batch size cannot exceed the dataset size (q <= 1)",
            ),
        )
        set_(self, "augmult", _validate.positive_int("augmult", self.augmult))
        set_(self, "sampling", _validate.one_of("sampling", self.sampling, SAMPLING_MODES))

    @property
    def sampling_rate(self) -> float:
        """q = B / N, the Poisson sampling probability of each example."""
        return self.expected_batch_size / self.dataset_size

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the noise added to the sum of clipped gradients."""
        return self.noise_multiplier * self.l2_norm_clip

    @property
    def update_noise_stddev(self) -> float:
        """Noise std on the averaged gradient: sigma * C / B."""
        return self.noise_stddev / self.expected_batch_size

    @property
    def eta_step(self) -> float:
        """Per-step Total Amount of Noise q / (sqrt(2) sigma); inf when sigma = 0."""
        return tan.eta_step(self.noise_multiplier, self.sampling_rate)

    def to_dict(self) -> dict:
        """The config as a plain dict (for logs, checkpoints and Keras configs)."""
        return dataclasses.asdict(self)
