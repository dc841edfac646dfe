"""Post-study analysis: the CIDEr/parameter Pareto front, its hypervolume, and the dashboards drawn from them."""
