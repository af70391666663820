"""Models assembled from specs: an MLP, or a model file (TOML) that lists layers.

A model file names each layer by built-in spec name or spec path (relative to the file), with
the sizes of its parameters and its hyper-parameters; ``flatten`` is a step, not a spec::

    loss = "softmax_cross_entropy_labels"   # the default; or "mse", or a loss spec file

    [[layers]]
    flatten = true

    [[layers]]
    spec = "linear"
    I = 64
    O = 32

    [[layers]]
    spec = "rmsnorm.py"                 # a spec file beside this one
    D = 32

    [[layers]]
    spec = "relu"

    [[layers]]
    spec = "linear"
    I = 32
    O = 10

A convolution is a spec like any other: ``{ spec = "conv2d", C = 1, O = 32, K = 3, S = 1,
P = 1 }`` (TOML's inline table, one layer per line inside ``layers = [ ... ]``), and so are
pooling (``maxpool2d`` with K, S, P), ``batchnorm2d`` (C) and ``global_avgpool``. A layer's
``init = { weight = "uniform" }`` replaces the spec's initialisation of the parameters named.
Model files shipped with gradtool (:mod:`gradtool.model_files`) are loaded by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from gradtool.errors import GradtoolError
from gradtool.nn.plan import as_spec

# softmax cross-entropy over integer class labels y[N] (F.cross_entropy(X, y)); a loss whose
# target is T[N, C] (softmax_cross_entropy, mse) gets the labels as one-hot rows
DEFAULT_LOSS = "softmax_cross_entropy_labels"


class ModelError(GradtoolError):
    """A model description that cannot be built."""


@dataclass
class LayerEntry:
    """One step of a model: a spec (name or path) with its sizes and hyper-parameters, or
    ``flatten``."""

    spec: str | None
    options: dict = field(default_factory=dict)
    flatten: bool = False

    def to_json(self) -> dict:
        return {"flatten": True} if self.flatten else {"spec": self.spec, **self.options}


@dataclass
class ModelDesc:
    layers: list[LayerEntry]
    loss: str = DEFAULT_LOSS
    source: str = "mlp"

    def spec_names(self) -> list[str]:
        """Every spec the model uses, the loss last, each once."""
        names = [e.spec for e in self.layers if not e.flatten] + [self.loss]
        return list(dict.fromkeys(names))

    def to_json(self) -> dict:
        return {"source": self.source, "loss": self.loss,
                "layers": [e.to_json() for e in self.layers]}


def _feature_options(spec_name: str, width: int, **hypers) -> dict:
    """Sizes of a per-feature layer (a norm, a parametric activation) placed after a layer of
    ``width`` outputs: every size its parameters use is the width."""
    spec = as_spec(spec_name)
    names = []
    for t in spec.tensors.values():
        if t.kind in ("param", "state"):
            for dim in t.dims:
                names += sorted(s.name for s in dim.free_symbols if s.name not in names)
    return {**{n: width for n in names}, **hypers}


def mlp(input_features: int, classes: int, hidden=(128,), activation: str = "relu",
        norm: str | None = None, dropout: float = 0.0, loss: str = DEFAULT_LOSS) -> ModelDesc:
    """flatten → [linear → norm? → activation → dropout?] per hidden size → linear.

    ``activation`` and ``norm`` are spec names or paths; their parameter sizes (if any) are set
    to the width of the layer before them."""
    layers = [LayerEntry(None, flatten=True)]
    width = input_features
    for h in hidden:
        layers.append(LayerEntry("linear", {"I": width, "O": int(h)}))
        if norm:
            layers.append(LayerEntry(norm, _feature_options(norm, int(h))))
        layers.append(LayerEntry(activation, _feature_options(activation, int(h))))
        if dropout > 0:
            layers.append(LayerEntry("dropout", {"p": float(dropout)}))
        width = int(h)
    layers.append(LayerEntry("linear", {"I": width, "O": int(classes)}))
    return ModelDesc(layers, loss=loss, source="mlp")


# the default CNN's channel widths: enough for 8×8 digits and 28×28 MNIST, small enough for a CPU
CNN_WIDTHS = (32, 64, 128)


def cnn(input_shape, classes: int, widths=CNN_WIDTHS, activation: str = "relu",
        dropout: float = 0.0, loss: str = DEFAULT_LOSS) -> ModelDesc:
    """A small CNN for (C, H, W) images of any size: per width w,
    conv2d 3×3 (stride 1, padding 1) → batchnorm2d → activation, with a 2×2 max-pool after
    every block but the last; then global_avgpool → dropout? → linear to the classes.

    8×8 digits go 8 → 4 → 2, 28×28 MNIST 28 → 14 → 7 before the global average. The
    convolutions' weights start as ``nn.Conv2d``'s do, uniform in ±1/√(C·K·K), not the spec's
    He init: ahead of batch norm their scale only sets Adam's effective step, and on digits the
    smaller one reaches 99.1 % against 98.2 % (plain torch.nn, seeds 0-2). Raises
    :class:`ModelError` when ``input_shape`` is not (C, H, W)."""
    if len(input_shape) != 3:
        raise ModelError(f"--model cnn needs images (C, H, W), but the data's samples have "
                         f"shape {tuple(input_shape)}",
                         hint="use --model mlp for flat features, or give the data as images")
    layers = []
    channels = int(input_shape[0])
    for k, w in enumerate(widths):
        layers.append(LayerEntry("conv2d", {"C": channels, "O": int(w), "K": 3, "S": 1, "P": 1,
                                            "init": {"weight": "uniform"}}))
        layers.append(LayerEntry("batchnorm2d", {"C": int(w)}))
        layers.append(LayerEntry(activation, {}))
        if k < len(widths) - 1:
            layers.append(LayerEntry("maxpool2d", {"K": 2, "S": 2, "P": 0}))
        channels = int(w)
    layers.append(LayerEntry("global_avgpool", {}))
    if dropout > 0:
        layers.append(LayerEntry("dropout", {"p": float(dropout)}))
    layers.append(LayerEntry("linear", {"I": channels, "O": int(classes)}))
    return ModelDesc(layers, loss=loss, source="cnn")


def model_file(name: str | Path) -> Path:
    """The model file ``name`` stands for: a shipped model (``vu-mnist-cnn``, see
    :func:`gradtool.model_files.shipped_models`) or a path. Raises :class:`ModelError` listing
    the shipped names when it is neither."""
    from gradtool.model_files import shipped_models

    shipped = shipped_models()
    if str(name) in shipped:
        return shipped[str(name)]
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    raise ModelError(f"no model {str(name)!r}",
                     hint=f"use mlp, cnn, a shipped model ({', '.join(shipped)}) or a "
                          "TOML model file")


def _resolve(name: str, base: Path) -> str:
    """A spec path relative to the model file, else the name as given (a built-in)."""
    if name.endswith(".py") or "/" in name:
        path = Path(name) if Path(name).is_absolute() else base / name
        return str(path.resolve())
    return name


def load_model_file(path: str | Path) -> ModelDesc:
    """Read a TOML model file (see the module docstring), or a shipped one by name
    (``vu-mnist-cnn``). Raises :class:`ModelError` naming the file and the entry at fault."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ModelError("model files need Python ≥ 3.11 (tomllib)") from None
    path = model_file(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"cannot read model file: {exc}", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"not valid TOML: {exc}", file=str(path)) from None
    unknown = set(data) - {"layers", "loss"}
    if unknown:
        raise ModelError(f"unknown key(s) {', '.join(sorted(unknown))}", file=str(path),
                         hint="a model file has `loss = ...` and [[layers]] tables")
    entries = data.get("layers")
    if not isinstance(entries, list) or not entries:
        raise ModelError("the model file lists no layers", file=str(path),
                         hint='add [[layers]] tables, each with spec = "name" or flatten = true')
    layers = []
    for k, entry in enumerate(entries, 1):
        entry = dict(entry)
        if entry.pop("flatten", False):
            if entry:
                raise ModelError(f"layer {k}: flatten takes no options "
                                 f"({', '.join(entry)})", file=str(path))
            layers.append(LayerEntry(None, flatten=True))
            continue
        name = entry.pop("spec", None)
        if not isinstance(name, str):
            raise ModelError(f"layer {k} names no spec", file=str(path),
                             hint='write spec = "linear" (a built-in) or spec = "my_layer.py"')
        layers.append(LayerEntry(_resolve(name, path.parent), entry))
        _check_spec_name(layers[-1].spec, f"layer {k}", path)
    loss = _resolve(str(data.get("loss", DEFAULT_LOSS)), path.parent)
    _check_spec_name(loss, "loss", path)
    return ModelDesc(layers, loss=loss, source=str(path))


def _check_spec_name(name: str, where: str, path: Path) -> None:
    """Raise :class:`ModelError` naming the model file and the entry when ``name`` is neither
    a built-in spec nor an existing file, with the closest built-in names."""
    import difflib

    from gradtool.spec.loader import builtin_specs

    if name.endswith(".py") or "/" in name:
        if not Path(name).exists():
            raise ModelError(f"{where}: spec file {name} does not exist", file=str(path),
                             hint="a relative spec path is read beside the model file")
        return
    names = builtin_specs()
    if name not in names and not Path(name).exists():
        close = difflib.get_close_matches(name, list(names), n=3)
        raise ModelError(f"{where}: no built-in spec named `{name}`", file=str(path),
                         hint=(f"did you mean {' or '.join(close)}? " if close else "")
                         + "`gradtool specs` lists them; a spec file is named by its path "
                           "(my_layer.py)")


def layer_refusal(spec) -> str | None:
    """Why ``spec`` (a name, path or :class:`Spec`) cannot be a layer of a sequential model,
    which hands each layer one array (the output of the layer before) and passes one on: the
    number of its data inputs (sampled masks do not count) or outputs when either is not one;
    None when it can."""
    spec = as_spec(spec)
    data = [t.name for t in spec.tensors.values() if t.kind == "input" and t.keep is None]
    outputs = [t.name for t in spec.outputs]
    if len(data) != 1:
        return (f"{spec.name} takes {_count(data, 'input')}, but a layer of a sequential "
                "model gets one, the output of the layer before")
    if len(outputs) != 1:
        return (f"{spec.name} gives {_count(outputs, 'output')}, but a layer of a sequential "
                "model passes one on")
    return None


def loss_refusal(spec) -> str | None:
    """Why ``spec`` cannot be a model's loss, which takes two data inputs (the model's outputs
    and the targets: labels ``y[N]`` or one-hot rows ``T[N, C]``) and gives one scalar; None
    when it can."""
    spec = as_spec(spec)
    data = [t.name for t in spec.tensors.values() if t.kind == "input" and t.keep is None]
    outputs = spec.outputs
    if len(data) != 2:
        return (f"{spec.name} takes {_count(data, 'input')}, but a loss takes two: the "
                "model's outputs and the targets")
    if len(outputs) != 1 or outputs[0].dims:
        return f"{spec.name} does not give one scalar, as a loss does"
    return None


def _count(names: list[str], noun: str) -> str:
    """"3 inputs (Q, K, V)", "1 input (X)", "0 inputs"."""
    text = f"{len(names)} {noun}{'' if len(names) == 1 else 's'}"
    return f"{text} ({', '.join(names)})" if names else text


def _model_file_of(desc: ModelDesc) -> str | None:
    """The model file an error should name (None for the built-in mlp and cnn)."""
    return None if desc.source in ("mlp", "cnn") else desc.source


def spec_hash(name: str) -> str:
    """sha256 of a spec file's text (built-in or path): what the run records and what the
    verification cache is keyed by. The file is read, not run: an edited spec that no longer
    loads still has a hash to compare."""
    from gradtool.spec.loader import resolve

    return hashlib.sha256(resolve(name).read_bytes()).hexdigest()


def refused_batch(model, input_shape, batch: int) -> str | None:
    """Why ``model`` (either backend) cannot train on a batch of ``batch`` samples of
    ``input_shape`` (a layer's message, e.g. batch norm's "needs N ≥ 2"), or None when it can.
    A batch of zeros goes through the model in eval mode, layer by layer, and each layer's
    sizes are bound as in training (``LayerPlan.training_refusal``): no state changes and no
    masks are drawn."""
    x = _zeros(model, (batch, *input_shape))
    was_training = model.training
    model.eval()
    try:
        for layer in model:
            plan = getattr(layer, "plan", None)
            if plan is not None:
                why = plan.training_refusal([tuple(x.shape)])
                if why is not None:
                    return why
            try:
                x = _eval_call(layer, x, _is_numpy(model))
            except GradtoolError as exc:
                return exc.message
    finally:
        model.train(was_training)
    return None


def _zeros(model, shape):
    """Zeros of ``shape`` in the model's array type, dtype and device."""
    if _is_numpy(model):
        import numpy as np

        dtype = next((layer.dtype for layer in model if hasattr(layer, "dtype")), np.float32)
        return np.zeros(shape, dtype=dtype)
    import torch

    ref = next(iter(model.parameters()), None)
    return torch.zeros(shape, dtype=ref.dtype if ref is not None else None,
                       device=ref.device if ref is not None else None)


def _is_numpy(model) -> bool:
    return hasattr(model, "attach_grads")  # a NumpySequential


def _eval_call(layer, x, numpy_backend: bool):
    """One layer's eval-mode output, without gradients."""
    if numpy_backend:
        return layer.forward(x)
    import torch

    with torch.no_grad():
        return layer(x)


def check_input(model, desc: ModelDesc, input_shape, classes: int | None = None) -> None:
    """Run one sample of zeros of ``input_shape`` through ``model`` (either backend) in eval
    mode, layer by layer, so that a model written for other inputs fails before training, at
    the layer that refuses what it gets; with ``classes``, check too that the model gives one
    output per class for each sample (the width of the scores the label losses read and of
    the one-hot targets of the others). Raises :class:`ModelError` naming that layer (for the
    width: the layer it comes from and the size that sets it), the shape it got and the
    data's; the model's mode is restored and no state changes (eval forms update nothing and
    draw no masks)."""
    layers = list(model)
    x = _zeros(model, (1, *input_shape))
    shapes = []  # each layer's output, per sample
    was_training = model.training
    model.eval()
    try:
        for k, (layer, entry) in enumerate(zip(layers, desc.layers, strict=True), 1):
            shape = tuple(x.shape[1:])
            try:
                x = _eval_call(layer, x, _is_numpy(model))
            except GradtoolError as exc:
                what = "flatten" if entry.flatten else entry.spec
                raise ModelError(
                    f"layer {k} ({what}) cannot take the samples of shape {shape} it gets from "
                    f"data of shape {tuple(input_shape)}: {exc.message}",
                    file=_model_file_of(desc),
                    hint="the model was written for other inputs: change its sizes (a linear "
                         "after flatten takes C·H·W features) or use data it was written for"
                ) from None
            shapes.append(tuple(x.shape[1:]))
    finally:
        model.train(was_training)
    if classes is not None and shapes and shapes[-1] != (classes,):
        _wrong_width(layers, desc, shapes, classes)


def _wrong_width(layers, desc: ModelDesc, shapes: list, classes: int) -> None:
    """Raise the :class:`ModelError` of a model whose samples come out with shape
    ``shapes[-1]`` instead of ``(classes,)``, naming the layer the shape comes from (the first
    of the trailing layers that keep it) and its size of that value, if any."""
    final = shapes[-1]
    k = len(shapes)
    while k > 1 and shapes[k - 2] == final:
        k -= 1
    entry = desc.layers[k - 1]
    what = "flatten" if entry.flatten else entry.spec
    plan = getattr(layers[k - 1], "plan", None)
    width = final[-1] if final else None
    sizes = [n for n, v in (plan.sizes.items() if plan is not None else ()) if v == width]
    set_by = f", its {sizes[0]} = {width}" if sizes else ""
    hint = (f"set {sizes[0]} = {classes} in layer {k}" if sizes and len(final) == 1 else
            f"end the model with a layer that gives {classes} values per sample, e.g. a "
            f"linear with O = {classes}")
    raise ModelError(f"the model gives samples of shape {final} (from layer {k}, {what}"
                     f"{set_by}), but the data has {classes} classes: the loss needs "
                     f"{classes} outputs per sample, one per class",
                     file=_model_file_of(desc), hint=hint)


def check_trainable(model, desc: ModelDesc) -> None:
    """Raise :class:`ModelError` when ``model`` (either backend) has no parameters, so that
    an optimiser would have nothing to train."""
    if not list(model.parameters()):
        raise ModelError("the model has no parameters to train (its layers: "
                         + ", ".join("flatten" if e.flatten else Path(e.spec).stem
                                     for e in desc.layers) + ")",
                         file=_model_file_of(desc),
                         hint="add a layer with parameters, e.g. a linear with I and O")


def build(desc: ModelDesc, backend: str = "torch", *, dtype: str = "float32", device=None,
          seed: int | None = None):
    """(model, loss) for ``desc`` on ``backend``: torch gives a
    :class:`~gradtool.nn.fused.SpecSequential` (an ``nn.Sequential`` that runs consecutive
    :class:`SpecModule` as one autograd node) and a :class:`LossModule`; numpy a
    :class:`NumpySequential` and a :class:`NumpyLoss`. Parameters are drawn from torch's RNG
    in both (the numpy model copies them), so the same seed gives the same initial weights on
    either backend. Raises :class:`ModelError`, naming the model file and the layer, for a
    layer that cannot be built (a size that is not a positive integer, a missing size), a
    layer spec that does not take one input and give one output, and a loss spec that does
    not take (outputs, targets) and give a scalar."""
    import torch

    from gradtool.nn.fused import SpecSequential
    from gradtool.nn.torch_layers import LossModule, SpecModule

    if backend not in ("torch", "numpy"):
        raise ModelError(f"unknown backend {backend!r}", hint="use torch or numpy")
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    if seed is not None:
        torch.manual_seed(seed)
    where = _model_file_of(desc)
    layers = []
    for k, e in enumerate(desc.layers, 1):
        if e.flatten:
            layers.append(torch.nn.Flatten())
            continue
        try:
            why = layer_refusal(e.spec)
            if why is None:
                layers.append(SpecModule(e.spec, dtype=tdtype, device=device, **e.options))
        except GradtoolError as exc:
            raise ModelError(f"layer {k} ({e.spec}): {exc}", file=where) from None
        if why is not None:
            raise ModelError(f"layer {k}: {why}", file=where,
                             hint="use a spec with one input here (relu, linear, layernorm, "
                                  "…); a loss goes in `loss = ...`")
    why = loss_refusal(desc.loss)
    if why is not None:
        raise ModelError(f"loss: {why}", file=where,
                         hint="use softmax_cross_entropy_labels, softmax_cross_entropy, mse or "
                              "a loss spec of that form")
    model = SpecSequential(*layers)
    if backend == "torch":
        return model, LossModule(desc.loss)
    import numpy as np

    from gradtool.nn.numpy_layers import NumpyFlatten, NumpyLayer, NumpyLoss, NumpySequential

    ndtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    np_layers = [NumpyFlatten() if e.flatten else
                 NumpyLayer(e.spec, dtype=ndtype, rng=rng, **e.options) for e in desc.layers]
    np_model = NumpySequential(np_layers)
    np_model.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return np_model, NumpyLoss(desc.loss, dtype=ndtype)
