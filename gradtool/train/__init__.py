"""Training: ``train(config) -> result`` over gradtool's layers, with run folders.

    from gradtool.train import TrainConfig, train
    result = train(TrainConfig(epochs=5))

torch is imported when training starts, not when this package is imported.
"""

from gradtool.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "DivergenceError", "load_model", "train"]


def __getattr__(name):
    if name in ("train", "TrainResult", "DivergenceError", "load_model"):
        from gradtool.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
