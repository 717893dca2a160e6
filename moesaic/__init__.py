"""moesaic: private experts trained apart, merged into one Mixture-of-Experts model."""

__version__ = "0.1.0"
