"""MLflow, behind one package: the schema of what a study logs, the writing side and the reading side."""
