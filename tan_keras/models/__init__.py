"""Models for private training: no BatchNorm anywhere."""
