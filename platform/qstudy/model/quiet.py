"""Quiet libraries in a process that trains: transformers' loading bars and notices, DeepSpeed's accelerator notice."""

from __future__ import annotations

import logging

# DeepSpeed warns, as it is imported, that it fell back to its CPU accelerator: on a CPU node that is the plan.
_DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


def _not_the_cpu_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_DEEPSPEED_CPU_NOTICE)


def quiet_weight_loading() -> None:
    """Turn off transformers' loading bars and info lines, and DeepSpeed's CPU-fallback warning, in this process:
    a run's log, or the study's live table, stays readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # A filter on the logger itself: DeepSpeed resets the logger's level and handlers when it is imported.
    deepspeed = logging.getLogger("DeepSpeed")
    if _not_the_cpu_notice not in deepspeed.filters:
        deepspeed.addFilter(_not_the_cpu_notice)
