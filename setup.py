"""Install tan_keras: DP-SGD for Keras with the Total Amount of Noise (TAN)."""

import setuptools

# tensorflow-privacy 0.9.0 imports only with TensorFlow <= 2.15, which caps the
# whole stack: Keras 2.15 (tf.keras), numpy < 2, tensorflow-metadata 1.16.1
# (newer releases need a protobuf that TF 2.15 cannot load).
INSTALL_REQUIRES = [
    "tensorflow==2.15.1",
    "tensorflow-privacy==0.9.0",
    "dp-accounting>=0.4.3,<0.5",
    "keras-cv==0.9.0",
    "tensorflow-datasets>=4.9,<4.10",
    "tensorflow-metadata==1.16.1",
    # TFDS's download path imports it without declaring it.
    "importlib_resources",
    "numpy<2",
    "absl-py",
    "matplotlib",
    # Ships the default dataset (handwritten digits) so training works offline.
    "scikit-learn",
]

TEST_REQUIRES = ["pytest", "scipy", "hypothesis", "ruff"]

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
    python_requires=">=3.9,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    license="Apache-2.0",
)
