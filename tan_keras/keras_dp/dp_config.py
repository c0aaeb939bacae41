"""The DP hyper-parameters of a training run, validated once, in one place."""

import dataclasses
from typing import Optional

from tan_keras import _validate
from tan_keras.privacy import accounting, releases, tan

SAMPLING_MODES = ("poisson", "caller_poisson", "shuffled")


# The DP settings a DPKerasModel's config holds, on either backend: its
# `from_config` takes them back as arguments.
MODEL_CONFIG_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "expected_batch_size",
    "dataset_size",
    "augmult",
    "ema_decay",
    "clipping",
    "examples_per_chunk",
    "sampling",
    "clipped_fraction_std",
    "release_train_metrics",
)


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
        at every step (tan_keras.mechanism.sampling), accounted with
        amplification by sampling. Every micro-batch carries the identity its
        sampler gave it (logical step, index within the step, N, B), and the
        model checks it against its privacy ledger: each step exactly once,
        in order, whole. "caller_poisson": the same accounting for Poisson
        micro-batches the caller draws and vouches for, elements `(x, y,
        mask, step_end)` without identity: nothing checks that they are
        Poisson samples or that each step is used once (the accountant says
        so). "shuffled": fixed-size batches that partition the data
        once per pass (`fit(x, y, batch_size=B)`), accounted WITHOUT
        amplification: each pass is one Gaussian mechanism in which a
        replaced example moves one batch's sum by at most 2C
        (replace-one adjacency), so epsilon grows with the number of passes.
      clipped_fraction_std: None (default), or the std s > 0 of a privately
        released clipped fraction: at every released step, the number of
        the step's examples whose gradient norm exceeded C gets Gaussian
        noise of std s * B (`clipped_count_noise_std`) and is divided by B,
        so the released fraction has std s (Andrew et al. 2021). It is
        accounted together with the gradient: epsilon uses
        `accounted_noise_multiplier`. Only with Poisson sampling.
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: int
    dataset_size: int
    augmult: int = 1
    sampling: str = "poisson"
    clipped_fraction_std: Optional[float] = None

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
        if self.clipped_fraction_std is not None:
            set_(
                self,
                "clipped_fraction_std",
                _validate.positive(
                    "clipped_fraction_std",
                    self.clipped_fraction_std,
                    hint="The std of the released clipped fraction (e.g. 0.05), or None",
                ),
            )
            if not self.poisson:
                # The replace-one analysis of shuffled batches has sensitivity
                # 2C for the gradient; its joint accounting with a count is
                # not implemented.
                raise _validate.invalid(
                    "clipped_fraction_std",
                    "None with sampling='shuffled' (the noisy clipped fraction is "
                    "accounted with Poisson sampling only)",
                    self.clipped_fraction_std,
                )

    @property
    def poisson(self) -> bool:
        """Whether batches are Poisson samples (checked or drawn by the caller)."""
        return self.sampling != "shuffled"

    @property
    def mechanism(self) -> releases.Mechanism:
        """The mechanism of one update, as the privacy ledger counts it.

        With sampling="caller_poisson" it is an unchecked one: the ledger
        counts those updates apart from checked Poisson ones, so the weights
        keep that fact wherever they go.
        """
        return releases.Mechanism(
            "poisson" if self.poisson else "shuffled",
            self.accounted_noise_multiplier,
            self.dataset_size,
            self.expected_batch_size,
            unchecked=self.sampling == "caller_poisson",
        )

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
    def clipped_count_noise_std(self) -> Optional[float]:
        """sigma_b = clipped_fraction_std * B, the noise std on the clipped count (None: off)."""
        if self.clipped_fraction_std is None:
            return None
        return self.clipped_fraction_std * self.expected_batch_size

    @property
    def accounted_noise_multiplier(self) -> float:
        """The sigma that accounts every release of a step: the noisy update and count.

        `noise_multiplier` without a released clipped fraction; with one,
        sigma_eff = (sigma^-2 + sigma_b^-2)^(-1/2) (see
        `accounting.effective_noise_multiplier`), 0 when sigma = 0. Every
        epsilon, step budget and eta of this config uses it.
        """
        return accounting.effective_noise_multiplier(
            self.noise_multiplier, self.clipped_count_noise_std
        )

    @property
    def eta_step(self) -> float:
        """Per-step Total Amount of Noise q / (sqrt(2) sigma_acc); inf when sigma = 0.

        sigma_acc is `accounted_noise_multiplier`: eta describes privacy.
        """
        return tan.eta_step(self.accounted_noise_multiplier, self.sampling_rate)

    def to_dict(self) -> dict:
        """The config as a plain dict (for logs, checkpoints and Keras configs)."""
        return dataclasses.asdict(self)
