"""Training examples for `fit` on the JAX backend: arrays or a random-access source.

Besides in-memory arrays, `fit` takes a map-style source, the protocol of
PyTorch's `Dataset` and Grain's `MapDataset`: `len(source)` is N and
`source[i]` returns example i as `(inputs, label)` (inputs with K views
first when augmult > 1), e.g. `image_views.AugmentedImages`, which draws
fresh views at every call. The model asks for each example of a Poisson
step by its own index, one call each, so a row of a step is what the source
made of that one example; a source must not make an example out of others
(a MixUp across examples), which the model cannot see into.

Both kinds give the Poisson steps one function, `rows(indices, count)`: the
drawn examples stacked, then zero rows up to `count`.
"""

import concurrent.futures
from typing import Any, Callable, Optional, Tuple

import numpy as np
from keras import tree

Rows = Callable[[np.ndarray, int], Tuple[Any, Any]]


def is_source(x: Any, y: Any) -> bool:
    """Whether `fit(x, y)` was given a random-access source rather than arrays."""
    if y is not None or isinstance(x, (np.ndarray, list, tuple, dict)):
        return False
    return hasattr(type(x), "__len__") and hasattr(type(x), "__getitem__")


def _padded(array: np.ndarray, count: int) -> np.ndarray:
    # Padding rows are zeros, never copies of a training row: they are
    # masked, but the data of an example must not appear where it was not drawn.
    out = np.zeros((count,) + array.shape[1:], dtype=array.dtype)
    out[: len(array)] = array
    return out


def array_rows(x: Any, y: Any) -> Rows:
    """`rows` over in-memory arrays (or structures of them) `x` and `y`."""

    def rows(indices: np.ndarray, count: int):
        return tree.map_structure(lambda a: _padded(a[indices], count), (x, y))

    return rows


def first_example(source) -> Tuple[Any, Any]:
    """Example 0 of a source, as arrays (the model is built from its shapes)."""
    return tree.map_structure(np.asarray, tuple(source[0]))


def loads_in_parallel(source) -> bool:
    """Whether `source[i]` may be called from several threads at once.

    Only the package's own sources say so (`image_views.AugmentedImages`,
    whose example i's views depend on i and its own calls only, over arrays
    or TFDS's ArrayRecord source, which shares one thread-safe reader per
    shard); a source of one's own is asked for its examples one at a time,
    a subclass of the package's too: the declaration is read from the
    class itself, not inherited, since a `__getitem__` of its own could
    share state between calls and return another example than the one
    asked for.
    """
    return vars(type(source)).get("LOADS_IN_PARALLEL", False) is True


def source_rows(source, pool: Optional[concurrent.futures.Executor] = None) -> Rows:
    """`rows` over a random-access source: one call per drawn example.

    Every example must have the structure, shapes and dtypes of example 0;
    a step is refused otherwise (its rows could not be stacked into the
    compiled step without changing what one example contributes).

    Args:
      source: `len(source)` examples, `source[i]` -> (inputs, label).
      pool: Optional; the threads that load a step's examples at once (for
        a source that `loads_in_parallel`: decoding and augmenting release
        the GIL), in the order of the indices.
    """
    first = first_example(source)
    expected = _specs(first)

    def rows(indices: np.ndarray, count: int):
        # Each example is written straight into its row of the step (zero
        # rows after them: padding), by the thread that loaded it: one copy.
        out = tree.map_structure(lambda a: np.zeros((count,) + a.shape, a.dtype), first)
        leaves = tree.flatten(out)

        def load(row: int) -> None:
            index = int(indices[row])
            example = tree.map_structure(np.asarray, tuple(source[index]))
            try:
                tree.assert_same_structure(example, first)
                same = _specs(example) == expected
            except (TypeError, ValueError):
                same = False
            if not same:
                raise ValueError(
                    f"Invalid value for `x`: source[{index}] must have the structure, "
                    f"shapes and dtypes of source[0] ({expected}). Received: "
                    f"{_specs(example)}."
                )
            for leaf, value in zip(leaves, tree.flatten(example)):
                leaf[row] = value

        rows_loaded = range(len(indices))
        # (list(): the first error of a load is raised here, in row order.)
        list(pool.map(load, rows_loaded) if pool is not None else map(load, rows_loaded))
        return out

    return rows


def _specs(example) -> list:
    """[(shape, dtype)] of an example's arrays, in flattening order."""
    return [(a.shape, a.dtype.name) for a in tree.flatten(example)]
