"""Many hosts on the JAX backend: two processes under `jax.distributed`, over loopback.

Two processes of two CPU devices each train one convolutional model under
`keras.distribution.DataParallel()`; a one-device run replays the secret
they shared. They must be one run: the same secret in both processes, each
step's examples loaded once across the hosts (each host its share), the
same weights everywhere, equal to the one-device run, with the noise drawn
once per logical step.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name("_two_hosts.py")
NOISES = (0.0, 1.0)
WEIGHTS = 6  # two Conv2D and one Dense: kernels and biases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir, processes, devices, secrets=None):
    env = dict(os.environ, KERAS_BACKEND="jax")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [str(processes), str(_free_port()), str(out_dir), ",".join(map(str, NOISES))]
    if secrets:
        args.append(",".join(secrets))
    launched = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i)] + args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    for process in launched:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    return [
        [dict(np.load(out_dir / f"process_{i}_{run}.npz")) for run in range(len(NOISES))]
        for i in range(processes)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    hosts_dir = tmp_path_factory.mktemp("two_hosts")
    one_dir = tmp_path_factory.mktemp("one_device")
    two_hosts = _run(hosts_dir, processes=2, devices=2)
    secrets = [str(run["secret"][0]) for run in two_hosts[0]]
    (one_device,) = _run(one_dir, processes=1, devices=1, secrets=secrets)
    return two_hosts, one_device


def _weights(run):
    return [run[f"w{i}"] for i in range(WEIGHTS)]


def _steps(run):
    """The indices loaded at each step."""
    return np.split(run["loaded"], np.cumsum(run["loaded_per_step"])[:-1])


def test_the_processes_share_one_secret_and_train_one_model(runs):
    (first, second), _ = runs
    for a, b in zip(first, second):
        assert int(a["devices"]) == 4
        assert a["secret"][0] == b["secret"][0]
        assert int(a["dp_steps"]) == int(b["dp_steps"]) == 3
        for wa, wb in zip(_weights(a), _weights(b)):
            np.testing.assert_array_equal(wa, wb)
    # Power of the split: a process alone, or a mesh of its own devices
    # only, is refused before any step.
    (no_distribution, own_devices, program, other_data) = first[0]["refusals"]
    assert "expected the same training examples in every process" in other_data
    assert "processes [1] hold other data" in other_data
    assert "The training program runs in one process (this is one of 2)" in program
    assert "DataParallel() over every process's devices" in no_distribution
    assert "leaves out 2 of the 4 devices of the 2 processes" in own_devices
    # Two fits draw two secrets (from OS entropy, never a default).
    assert first[0]["secret"][0] != first[1]["secret"][0]


def test_each_host_loads_only_its_share_of_every_step(runs):
    (first, second), one_device = runs
    for a, b, one in zip(first, second, one_device):
        steps_a, steps_b, steps_one = _steps(a), _steps(b), _steps(one)
        assert len(steps_a) == len(steps_b) == len(steps_one) == 3
        for mine, theirs, whole in zip(steps_a, steps_b, steps_one):
            assert not set(mine) & set(theirs)
            assert sorted(np.concatenate([mine, theirs])) == sorted(whole)
            # An even split: host p holds drawn examples p, p + 2, ...
            assert len(mine) - len(theirs) in (0, 1)


def test_two_hosts_equal_one_device_with_the_noise_drawn_once(runs):
    (first, _), (quiet_one, noisy_one) = runs
    quiet_two, noisy_two = first
    for two, one in zip(_weights(quiet_two), _weights(quiet_one)):
        np.testing.assert_allclose(two, one, atol=2e-6)
    # sigma = 1: the same noise as the one-device run, which draws it once
    # per step from the step's key. Power: the noise moves the weights far
    # more than the tolerance, so noise drawn per host or per device (another
    # value, or sqrt(2) the std) would fail.
    moved = max(np.abs(n - q).max() for n, q in zip(_weights(noisy_one), _weights(quiet_one)))
    assert moved > 0.05
    for two, one in zip(_weights(noisy_two), _weights(noisy_one)):
        np.testing.assert_allclose(two, one, atol=2e-5)
