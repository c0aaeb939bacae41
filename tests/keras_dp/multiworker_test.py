"""Two workers of MultiWorkerMirroredStrategy on localhost equal one device.

Each worker is a subprocess (`_multiworker_worker.py`) talking to the other
over loopback gRPC; both draw the same Poisson batches from a shared secret
key and keep half of each micro-batch's rows.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_multiworker_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all_succeed(procs):
    """Waits for every process (killing all if one hangs); each must exit 0."""
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    failed = [(p.returncode, err[-3000:]) for p, (_, err) in zip(procs, results) if p.returncode]
    assert not failed, failed


def _run(tmp_path, broken=False):
    key = "12345678901234567"
    ports = [str(_free_port()), str(_free_port())]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if broken:
        env["TAN_TEST_BROKEN_SHARDING"] = "1"
    outs = [tmp_path / f"w{i}.json" for i in range(2)] + [tmp_path / "single.json"]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *ports, index, key, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index, out in zip(["0", "1", "single"], outs)
    ]
    _wait_all_succeed(procs)
    return [json.loads(o.read_text()) for o in outs]


def _flat(result):
    return np.concatenate([np.ravel(w) for w in result["weights"]])


def test_two_workers_equal_the_single_device_run_without_noise(tmp_path):
    worker0, worker1, single = _run(tmp_path)
    assert worker0["steps"] == worker1["steps"] == single["steps"] == 3
    np.testing.assert_allclose(_flat(worker0), _flat(single), atol=1e-5)
    np.testing.assert_allclose(_flat(worker1), _flat(single), atol=1e-5)


def test_power_check_hosts_feeding_the_whole_batch_are_detected(tmp_path):
    worker0, _, single = _run(tmp_path, broken=True)
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
