"""vqlog: Optuna sweeps of an S4D-VQ-VAE on 1-D signals, tracked in MLflow, tabled like a lab log."""

__version__ = "0.1.0"
