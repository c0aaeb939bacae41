"""Privacy accounting with the Total Amount of Noise (TAN)."""
