"""nasty: make image classifiers undistillable, attack them as a thief would, and audit the result."""

__version__ = "0.1.0"
