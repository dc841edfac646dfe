"""The ``frozen`` method: its config (``config.py``, torch-free) and its modules (``modules.py``)."""
