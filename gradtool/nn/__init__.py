"""Layers and models over generated kernels, for both backends.

* :class:`SpecModule` / :class:`LossModule`: ``torch.nn.Module``s over the generated
  ``torch.autograd.Function``s (torch.optim, DataLoader and DDP work unchanged; torch.compile
  traces a model as one graph once :func:`gradtool.nn.fused.prepare_calls` has run);
  :class:`SpecSequential` (what :func:`build` returns) runs consecutive SpecModules as one.
* :class:`NumpyLayer`, :class:`NumpyLoss`, :class:`NumpySequential`: forward/backward on NumPy
  arrays with no autograd; ``torch.optim`` updates their arrays in place.
* :func:`mlp`, :func:`cnn`, :func:`load_model_file`, :func:`build`: models from a description
  (a model file by path, or a shipped one by name: ``vu-mnist-cnn``).

torch is imported only when a torch layer is used.
"""

from gradtool.nn.models import (
    LayerEntry,
    ModelDesc,
    ModelError,
    build,
    cnn,
    load_model_file,
    mlp,
)
from gradtool.nn.plan import LayerError, LayerPlan

__all__ = ["LayerEntry", "LayerError", "LayerPlan", "LossModule", "ModelDesc", "ModelError",
           "NumpyFlatten", "NumpyLayer", "NumpyLoss", "NumpySequential", "SpecModule",
           "SpecSequential", "build", "cnn", "load_model_file", "mlp"]


def __getattr__(name):
    if name in ("SpecModule", "LossModule"):
        from gradtool.nn import torch_layers

        return getattr(torch_layers, name)
    if name == "SpecSequential":
        from gradtool.nn import fused

        return fused.SpecSequential
    if name in ("NumpyLayer", "NumpyLoss", "NumpySequential", "NumpyFlatten"):
        from gradtool.nn import numpy_layers

        return getattr(numpy_layers, name)
    raise AttributeError(name)
