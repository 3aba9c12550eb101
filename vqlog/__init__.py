"""vqlog: Optuna sweeps of an S4D-VQ-VAE on 1-D signals, tracked in MLflow, tabled like a lab log.

    import vqlog
    vqlog.sweep(trials=20, config="smoke")     # vqlog-sweep, in-process: returns the summary
    vqlog.results("smoke")                     # the trials as a pandas DataFrame

Importing vqlog loads nothing heavy and changes no process-wide state (see vqlog.api).
"""

__version__ = "0.1.0"
__all__ = ["results", "sweep"]


def __getattr__(name: str):
    if name in __all__:
        from vqlog import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqlog' has no attribute {name!r}")
