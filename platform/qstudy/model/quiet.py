"""Quiet weight loading: transformers' progress bars and notices stay out of a run's own output."""

from __future__ import annotations


def quiet_weight_loading() -> None:
    """Turn off transformers' loading bars and info lines in this process: a run's log, or Tune's live table, stays readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
