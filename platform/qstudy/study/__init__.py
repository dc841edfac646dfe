"""Hyperparameter studies: search spaces, Ray Tune + Optuna trials on Ray Train workers, MLflow tracking."""
