"""Two workers of MultiWorkerMirroredStrategy on localhost equal one device.

Each worker is a subprocess (`_multiworker_worker.py`) talking to the other
over loopback gRPC; both draw the same Poisson batches from a shared secret
key and keep half of each micro-batch's rows.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_multiworker_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs):
    """Waits for every process (killing all if one hangs); returns [(code, stderr)]."""
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, results)]


def _wait_all_succeed(procs):
    """Waits for every process (killing all if one hangs); each must exit 0."""
    failed = [(code, err[-3000:]) for code, err in _wait_all(procs) if code]
    assert not failed, failed


KEY = "12345678901234567"


def _worker(ports, index, out, env):
    return subprocess.Popen(
        [sys.executable, WORKER, *ports, index, KEY, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start(tmp_path, broken=False, identity_check=True):
    """Starts the two workers; returns (processes, their output files)."""
    ports = [str(_free_port()), str(_free_port())]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if broken:
        env["TAN_TEST_BROKEN_SHARDING"] = "1"
    if not identity_check:
        env["TAN_TEST_NO_IDENTITY_CHECK"] = "1"
    outs = [tmp_path / f"w{i}.json" for i in range(2)]
    return [_worker(ports, str(i), out, env) for i, out in enumerate(outs)], outs


@functools.cache
def _single_device_run():
    """The one-device reference run (the same for every test: run once per worker)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "single.json")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        _wait_all_succeed([_worker(["0", "0"], "single", out, env)])
        with open(out) as f:
            return json.load(f)


def _run(tmp_path, broken=False, identity_check=True):
    procs, outs = _start(tmp_path, broken, identity_check)
    _wait_all_succeed(procs)
    return [json.loads(o.read_text()) for o in outs] + [_single_device_run()]


def _flat(result):
    return np.concatenate([np.ravel(w) for w in result["weights"]])


def test_two_workers_equal_the_single_device_run_without_noise(tmp_path):
    worker0, worker1, single = _run(tmp_path)
    assert worker0["steps"] == worker1["steps"] == single["steps"] == 3
    np.testing.assert_allclose(_flat(worker0), _flat(single), atol=1e-5)
    np.testing.assert_allclose(_flat(worker1), _flat(single), atol=1e-5)


def test_hosts_feeding_the_whole_batch_are_refused(tmp_path):
    # The bug: every host feeds the whole global micro-batch, so each example
    # would count twice. The rows' identities say which rows each replica
    # must hold: the workers refuse before any update.
    procs, _ = _start(tmp_path, broken=True)
    results = _wait_all(procs)
    for code, err in results[:2]:
        assert code != 0 and "incomplete or out of order" in err, err[-3000:]


def test_power_check_without_the_identity_check_the_whole_batch_changes_the_weights(tmp_path):
    worker0, _, single = _run(tmp_path, broken=True, identity_check=False)
    assert not np.allclose(_flat(worker0), _flat(single), atol=1e-5)


def test_training_program_runs_on_two_workers(tmp_path):
    from tan_keras.privacy import accounting

    key_file = tmp_path / "key"
    key_file.write_text("1234567890123\n")
    key_file.chmod(0o600)  # a key others can read is refused
    ports = [_free_port(), _free_port()]
    procs = []
    for index in range(2):
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        args = [
            "--strategy=multiworker",
            f"--sampling_key_file={key_file}",
            "--steps=3",
            "--batch_size=64",
            "--augmult=1",
            "--augment=none",
            f"--model_dir={tmp_path / 'run'}",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tan_keras.train", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    _wait_all_succeed(procs)
    chief = json.loads((tmp_path / "run" / "metrics.json").read_text())
    other = json.loads((tmp_path / "run" / "worker_1" / "metrics.json").read_text())
    assert chief["steps"] == other["steps"] == 3
    assert chief["epsilon"] == accounting.compute_epsilon(
        chief["noise_multiplier"], 64 / 1437, 3, 1e-5
    )
    # Every worker applied the same updates.
    assert chief["test_accuracy"] == other["test_accuracy"]
    assert chief["test_accuracy_ema"] == other["test_accuracy_ema"]


def _program(args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "tan_keras.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _checkpoint_weights(run_dir, step=None):
    import tensorflow as tf

    path = run_dir / "checkpoints"
    reader = tf.train.load_checkpoint(str(path if step is None else path / f"ckpt-{step}"))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith("model_variables/")
    }


def test_two_workers_train_imagenet_format_data_like_one_device(tmp_path):
    # The synthetic imagenet2012 in TFDS's array_record format: each worker
    # reads and decodes only its half of every micro-batch, views keyed by
    # (step, example, view); without noise the weights equal the one-device
    # run's (the same batches from the same seeded key: debugging only).
    from tan_keras.data.synthetic_imagenet import make_synthetic_imagenet

    data_dir = tmp_path / "tfds"
    make_synthetic_imagenet(str(data_dir), train=16, validation=4)
    common = [
        "--dataset=imagenet2012",
        f"--data_dir={data_dir}",
        "--model=small_cnn",
        "--batch_size=4",
        "--physical_batch_size=8",
        "--steps=2",
        "--augmult=2",
        "--noise_multiplier=0",
        "--lr=1",
        "--delta=1e-3",
        "--noise_seed=11",
        "--checkpoint_every=1",
    ]
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [
        _program(
            [*common, "--strategy=multiworker", f"--model_dir={tmp_path / 'two'}"],
            dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="3",
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            ),
        )
        for i in range(2)
    ]
    procs.append(
        _program(
            [*common, f"--model_dir={tmp_path / 'one'}"], dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        )
    )
    _wait_all_succeed(procs)
    two, one = _checkpoint_weights(tmp_path / "two"), _checkpoint_weights(tmp_path / "one")
    assert two.keys() == one.keys() and two
    for name, value in one.items():
        # Sums over two hosts round in another order: float32 tolerance.
        np.testing.assert_allclose(two[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["steps"] == 2
    # The second step moved the weights (the comparison is not of two no-ops).
    after_one = _checkpoint_weights(tmp_path / "one", step=1)
    assert any(not np.allclose(after_one[name], one[name]) for name in one)
