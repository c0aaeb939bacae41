"""Times the pieces of the DP step against their alternatives, side by side.

Sections (each prints milliseconds, medians over timed runs after warm-up,
and the ratio to the section's baseline):
  clip   -- clipping WideResNet-16-4's per-example gradients: the per-row norm
            as an einsum "bn,bn->b" (baseline), as square + sum, and as
            EuclideanNorm (what clipping.py uses without XLA); and the whole
            `clip_and_sum`.
  conv   -- the weight gradient of one 3x3 convolution at WRN-16-4's three
            stage shapes: batched over the examples (baseline: what a plain
            step computes), per example with tf.vectorized_map (a while loop),
            per example from unfolded patches and a batched matmul (the
            layerwise rule), per example as one grouped convolution, and
            ghost clipping (tan_keras.mechanism.ghost: norms from the Gram matrices of
            inputs and output gradients, then one batched weight gradient of
            the clip-weighted output gradients).
  chunk  -- per-example gradients plus clipping of WRN-16-4 through
            chunking.clip_in_chunks, for several chunk sizes (baseline: the
            whole batch at once).

Example (CPU, about 1-2 minutes):
  python benchmarks/per_example_ops.py --batch=64
"""

import argparse

from _bench import median_seconds

SECTIONS = ("clip", "conv", "chunk")


def _median_ms(fn, steps, warmup):
    return 1000 * median_seconds(lambda: fn().numpy(), steps, warmup)


def _report(title, timings):
    base = next(iter(timings.values()))
    print(title)
    for name, ms in timings.items():
        if ms is None:
            print(f"  {name:<28} {'n/a':>9}    (no kernel for it on this device)", flush=True)
        else:
            print(f"  {name:<28} {ms:>9.1f} ms {ms / base:>7.2f}x", flush=True)


def _median_ms_if_supported(fn, steps, warmup):
    """`_median_ms`, or None where the device has no kernel for the method.

    The grouped convolution's filter gradient exists on GPUs (cuDNN) and on
    oneDNN CPU builds, not in TensorFlow's generic CPU kernel.
    """
    import tensorflow as tf

    try:
        return _median_ms(fn, steps, warmup)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        return None


def _wrn():
    from tan_keras.models import build_model

    return build_model("wrn16_4", (32, 32, 3), 10)


def clip_section(batch, steps, warmup):
    import tensorflow as tf

    from tan_keras.mechanism.clipping import clip_and_sum

    grads = [
        tf.Variable(tf.random.normal([batch] + v.shape.as_list()))
        for v in _wrn().trainable_variables
    ]

    def rows():
        return [tf.reshape(g, [batch, -1]) for g in grads]

    def total(per_variable):
        return tf.reduce_sum(tf.add_n(per_variable))

    candidates = {
        "norms: einsum bn,bn->b": lambda: total([tf.einsum("bn,bn->b", g, g) for g in rows()]),
        "norms: square + sum": lambda: total([tf.reduce_sum(tf.square(g), 1) for g in rows()]),
        "norms: EuclideanNorm": lambda: total(
            [tf.square(tf.math.reduce_euclidean_norm(g, 1)) for g in rows()]
        ),
        "clip_and_sum (all of it)": lambda: total(
            [tf.reduce_sum(s) for s in clip_and_sum(list(grads), 1.0, tf.ones([batch])).grad_sum]
        ),
    }
    timings = {name: _median_ms(tf.function(f), steps, warmup) for name, f in candidates.items()}
    _report(f"clip: WRN-16-4 per-example gradients, batch {batch}", timings)


def conv_section(batch, steps, warmup):
    import tensorflow as tf

    strides = [1, 1, 1, 1]
    for size, channels in ((32, 64), (16, 128), (8, 256)):
        x = tf.Variable(tf.random.normal([batch, size, size, channels]))
        g = tf.Variable(tf.random.normal([batch, size, size, channels]))
        kernel = tf.constant([3, 3, channels, channels])

        def batched(x=x, g=g, kernel=kernel):
            return tf.reduce_sum(
                tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=kernel, out_backprop=g, strides=strides, padding="SAME"
                )
            )

        def while_loop(x=x, g=g, kernel=kernel):
            def one(args):
                return tf.raw_ops.Conv2DBackpropFilter(
                    input=args[0][None],
                    filter_sizes=kernel,
                    out_backprop=args[1][None],
                    strides=strides,
                    padding="SAME",
                )

            return tf.reduce_sum(tf.vectorized_map(one, (x, g)))

        def patches(x=x, g=g, size=size, channels=channels):
            p = tf.image.extract_patches(x, [1, 3, 3, 1], strides, [1, 1, 1, 1], "SAME")
            p = tf.reshape(p, [batch, size * size, 9 * channels])
            rows = tf.reshape(g, [batch, size * size, channels])
            return tf.reduce_sum(tf.matmul(p, rows, transpose_a=True))

        def grouped(x=x, g=g, size=size, channels=channels):
            # The examples become the groups of one batch-1 convolution.
            def stack(t):
                return tf.reshape(tf.transpose(t, [1, 2, 0, 3]), [1, size, size, -1])

            return tf.reduce_sum(
                tf.raw_ops.Conv2DBackpropFilter(
                    input=stack(x),
                    filter_sizes=tf.constant([3, 3, channels, batch * channels]),
                    out_backprop=stack(g),
                    strides=strides,
                    padding="SAME",
                )
            )

        ghost_kernel = _ghost_kernel(x, g, size, channels)

        candidates = {
            "batched (not per example)": batched,
            "per example: while loop": while_loop,
            "per example: patches+matmul": patches,
            "per example: grouped conv": grouped,
            "ghost norms + clipped sum": ghost_kernel,
        }
        timings = {
            n: _median_ms_if_supported(tf.function(f), steps, warmup) for n, f in candidates.items()
        }
        _report(f"conv: 3x3 weight gradient, {size}x{size}x{channels}, batch {batch}", timings)


def _ghost_kernel(x, g, size, channels):
    """Ghost clipping of one 3x3 "same" convolution's kernel, as ghost.py does it."""
    import keras
    import tensorflow as tf

    from tan_keras.mechanism.ghost import GhostGradient

    inputs = keras.Input((size, size, channels))
    layer = keras.layers.Conv2D(channels, 3, padding="same")
    keras.Model(inputs, layer(inputs))
    keep = tf.ones([x.shape[0]], tf.bool)
    clip = tf.constant(1.0)

    def run():
        ghost = GhostGradient(layer, (x[:, None],), (g[:, None],))
        denom = tf.maximum(tf.sqrt(ghost.squared_norms()), clip)
        return tf.reduce_sum(ghost.clipped_sum(keep, denom, clip))

    return run


def chunk_section(batch, steps, warmup):
    import keras
    import numpy as np
    import tensorflow as tf

    from tan_keras.mechanism import chunking, per_example

    model = _wrn()
    loss_fn = per_example.unreduced_loss_fn(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(0)
    views = tf.constant(rng.random((batch, 1, 32, 32, 3), dtype=np.float32))
    labels = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    variables = model.trainable_variables

    def make(size):
        def run():
            clipped, _, _ = chunking.clip_in_chunks(
                lambda v, y: per_example.per_example_gradients(model, loss_fn, v, y),
                variables,
                views,
                labels,
                tf.ones([batch]),
                1.0,
                size,
            )
            return tf.add_n([tf.reduce_sum(s) for s in clipped.grad_sum])

        return tf.function(run)

    sizes = [None] + [s for s in (batch // 2, batch // 4, batch // 8) if s >= 1]
    timings = {
        ("whole batch" if s is None else f"chunks of {s}"): _median_ms(make(s), steps, warmup)
        for s in dict.fromkeys(sizes)
    }
    _report(f"chunk: WRN-16-4 per-example gradients + clipping, batch {batch}", timings)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--steps", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"--sections: unknown section {name!r}; expected some of {SECTIONS}")
    for name, low in (("batch", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected an integer >= {low}; received {getattr(args, name)}")
    runners = {"clip": clip_section, "conv": conv_section, "chunk": chunk_section}
    for name in sections:
        runners[name](args.batch, args.steps, args.warmup)


if __name__ == "__main__":
    main()
