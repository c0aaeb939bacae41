"""tan_keras: differentially private training for Keras, the TAN way."""

__version__ = "0.1.0"
