"""qstudy: distributed hyperparameter studies of PEFT methods for video captioning."""

__version__ = "0.1.0"
