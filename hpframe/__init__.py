"""hpframe: a declarative, config-driven hybrid-parallel trainer for Mixture-of-Experts language models."""

__version__ = "0.1.0"
