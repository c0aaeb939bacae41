"""Which examples a run trains on, and what its outputs say about them.

Without --tuning_examples a run trains on the dataset's whole train split.
With it, the split is cut in two disjoint parts (`tan_keras.data.splits`): a
tuning set for the search's simulations and the private set for the private
run; --train_on picks the part this run trains on, and N is that part's size.

`released_noiseless` names the outputs computed WITHOUT noise on the
examples a run trains on, for the plan, the metrics JSON and the README.
"""

import dataclasses
from typing import Any, Optional, Tuple

from tan_keras.data import splits
from tan_keras.training.train_config import NOISELESS_STATISTICS, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """The examples one run trains on.

    Attributes:
      dataset: Dataset name.
      part: "all" (no split), "private" or "tuning".
      size: N, the examples this run trains on.
      split_size: N of the dataset's whole train split.
      tuning_examples: Size of the tuning split (None without one).
      tuning_split_seed: Its public seed (None without one).
    """

    dataset: str
    part: str
    size: int
    split_size: int
    tuning_examples: Optional[int] = None
    tuning_split_seed: Optional[int] = None

    @property
    def private_size(self) -> int:
        """N of the private set: the train split minus any tuning split."""
        return self.split_size - (self.tuning_examples or 0)

    def describe(self) -> str:
        """One line for the plan: which examples, how many, what is left out."""
        if self.part == "all":
            return f"{self.dataset}, N={self.size} training examples"
        split = (
            f"--tuning_examples={self.tuning_examples} --tuning_split_seed={self.tuning_split_seed}"
        )
        if self.part == "private":
            return (
                f"{self.dataset}, N={self.size} private training examples (the train split's "
                f"{self.split_size} minus the {self.tuning_examples} of the tuning split, "
                f"{split}, never trained on by this run)"
            )
        return (
            f"{self.dataset}, N={self.size} tuning examples held out of the train split's "
            f"{self.split_size} ({split}); the private set, the other {self.private_size}, "
            "is never trained on by this run"
        )

    def to_dict(self) -> dict:
        """JSON-ready: "training_set", "train_split_size", "tuning_examples", ..."""
        return {
            "training_set": self.part,
            "train_split_size": self.split_size,
            "tuning_examples": self.tuning_examples,
            "tuning_split_seed": self.tuning_split_seed,
        }


def choose(config: TrainConfig, data: Any) -> Tuple[Any, TrainingSet]:
    """The dataset restricted to the examples `config` trains on.

    Args:
      config: The run's settings (tuning_examples, tuning_split_seed,
        train_on).
      data: A `datasets.ArrayDataset`, or the `DatasetFacts` of a dry run
        without data.

    Returns:
      (data, training_set): `data` with only the chosen part as its training
      set (its test set unchanged), and the `TrainingSet`.

    Raises:
      ValueError: naming --tuning_examples if it does not leave both parts
        at least one example.
    """
    if config.tuning_examples is None:
        return data, TrainingSet(config.dataset, "all", data.size, data.size)
    split = splits.tuning_split(data.size, config.tuning_examples, config.tuning_split_seed)
    part = splits.training_part(data, split, config.train_on)
    return part, TrainingSet(
        config.dataset,
        config.train_on,
        part.size,
        data.size,
        config.tuning_examples,
        config.tuning_split_seed,
    )


def reference_dataset_size(config: TrainConfig, training_set: TrainingSet) -> Optional[int]:
    """N of the private run a simulation reproduces, where it differs from this run's.

    Returns:
      The private set's N for a simulation on the tuning split,
      --ref_dataset_size for one on other data, else None (the same N).
    """
    if config.noise_mode != "simulation":
        return None
    if training_set.part == "tuning":
        return training_set.private_size
    return config.ref_dataset_size


def released_noiseless(config: TrainConfig) -> Tuple[str, ...]:
    """The outputs of a run computed without noise on the examples it trains on.

    Returns:
      Their names as they appear in the progress bar, TensorBoard (epoch_*)
      and the run's log: empty with --release=private.
    """
    return () if config.release == "private" else NOISELESS_STATISTICS
