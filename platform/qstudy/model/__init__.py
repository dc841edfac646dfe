"""The base captioner: vision tower, projector and causal LM, with an extension point adapters attach to."""
