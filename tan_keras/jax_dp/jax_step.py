"""What Keras's stateless JAX train step runs over: its devices and its state."""

import keras

from tan_keras.jax_dp import hosts


def data_parallel() -> tuple:
    """The devices the step's rows are split over.

    Returns:
      (mesh, batch axis, device count) of the current
      `keras.distribution.DataParallel`, else (None, None, 1).

    Raises:
      ValueError: under another distribution, or in a process of several
        without a `DataParallel` over all their devices (`hosts.py`).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        hosts.check_mesh_spans_every_process(None)
        return None, None, 1
    if not isinstance(distribution, keras.distribution.DataParallel):
        raise ValueError(
            f"Invalid distribution: {type(distribution).__name__}. DP training on the JAX "
            "backend runs on one device or under keras.distribution.DataParallel."
        )
    from keras.src.backend.jax import distribution_lib

    mesh = distribution_lib._to_backend_mesh(distribution.device_mesh)
    axis = distribution.batch_dim_name
    hosts.check_mesh_spans_every_process(mesh)
    return mesh, axis, mesh.shape[axis]


def training_state(model: keras.Model) -> tuple:
    """The state Keras's JAX `train_step` takes, read from a compiled, built model.

    Args:
      model: A compiled model whose layers are built.

    Returns:
      (trainable, non-trainable, optimizer, metrics) variable values, as lists.
    """
    model.optimizer.build(model.trainable_variables)
    return tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
