"""Install tan_keras: DP-SGD for Keras with the Total Amount of Noise (TAN)."""

import setuptools

# Keras 3 on the TensorFlow backend is the one supported Keras. TF 2.20 (with
# Keras 3.13) is Colab's stack; Keras 3.12 is the last release for Python
# 3.10. TF 2.21 no longer pulls in tensorboard, which the TensorBoard callback
# needs. tensorflow-privacy is not a dependency: it is only the benchmark's
# comparison baseline, in its own environment (benchmarks/README.md).
INSTALL_REQUIRES = [
    "tensorflow>=2.20,<2.22",
    "keras>=3.12,<4",
    "dp-accounting>=0.6,<0.7",
    "tensorflow-datasets>=4.9",
    "tensorboard",
    # TFDS's download path imports it without declaring it.
    "importlib_resources",
    "numpy>=2",
    "absl-py",
    "matplotlib",
    # Ships the default dataset (handwritten digits) so training works offline.
    "scikit-learn",
    # The scaling law's and the audit's statistics (dp-accounting needs it too).
    "scipy",
]

# pytest-xdist: the README's test command runs the suite on 2 processes.
# JAX: tests_jax/ (the JAX backend, tan_keras.jax_dp), run by tests/jax_backend_test.py
# in a process of its own; JAX needs Python 3.11 or later.
TEST_REQUIRES = [
    "pytest",
    "pytest-xdist",
    "hypothesis",
    "ruff",
    "jax[cpu]>=0.7; python_version >= '3.11'",
]

setuptools.setup(
    name="tan_keras",
    version="0.1.0",
    description=(
        "Differentially private training for Keras (DP-SGD) with the Total "
        "Amount of Noise scaling laws of Sander et al. (ICML 2023)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tan_keras", "tan_keras.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    license="Apache-2.0",
)
