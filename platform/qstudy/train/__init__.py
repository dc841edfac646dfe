"""Training a captioner: the engine (PyTorch or DeepSpeed), the recipe, the checks, frozen-prefix reuse and pretraining."""
