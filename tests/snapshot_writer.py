"""Writes EDM/EDM2 snapshot pickles in the layout NVIDIA's training code writes, without NVIDIA's code: a test helper.

NVIDIA's ``torch_utils.persistence`` pickles each network module as ``_reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=<source>, class_name=<name>, state=<the module's __dict__>)``;
``torch.nn.ModuleDict`` (``enc``, ``dec``) is pickled as an ordinary object, tensors as torch pickles them (storages as
``torch.storage._load_from_bytes(<legacy torch.save bytes>)``), and EDM2's top level is a ``dnnlib.util.EasyDict``.
For pickle to name those globals, small stand-in modules are put in ``sys.modules`` while a pickle is written and taken
out afterwards: nothing outside this file sees them, and none of them is ever called.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_MISSING = object()


def _named(fn_or_cls: Any, module: str, name: str) -> Any:
    fn_or_cls.__module__, fn_or_cls.__name__, fn_or_cls.__qualname__ = module, name, name
    return fn_or_cls


def _never_called(*args: Any) -> Any:
    raise AssertionError("a stand-in for NVIDIA's code was called: only its name belongs in a pickle")


_reconstruct_persistent_obj = _named(
    lambda *args: _never_called(*args), "torch_utils.persistence", "_reconstruct_persistent_obj"
)
_numpy1_scalar = _named(lambda *args: _never_called(*args), "numpy.core.multiarray", "scalar")


class EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access), pickled under that name."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


_named(EasyDict, "dnnlib.util", "EasyDict")


class Persistent:
    """An object as ``torch_utils.persistence`` pickles it: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str) -> None:
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self) -> tuple:
        return (_reconstruct_persistent_obj, (self.meta,), None)  # NVIDIA's Decorator.__reduce__ returns this triple


class Call:
    """Pickles as a call of ``fn(*args)``: how a hostile file makes ``pickle.load`` run something."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def module_source(marker: Path | None = None) -> str:
    """A ``module_src`` standing in for ``training/networks.py``; executed, it would create ``marker``."""
    lines = ['"""Stands in for training/networks.py: NVIDIA\'s loader exec()s this text; a safe reader never does."""']
    if marker is not None:
        lines += ["import pathlib", f"pathlib.Path({str(marker)!r}).write_text('module_src was executed')"]
    lines += ["import torch", "", "class EDMPrecond(torch.nn.Module):", "    pass", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def nvidia_names(numpy1: bool = False) -> Iterator[None]:
    """While inside, pickle can name ``torch_utils.persistence``, ``dnnlib.util`` (and numpy 1.x's
    ``numpy.core.multiarray``): stand-in modules in ``sys.modules``, restored on the way out."""
    fakes = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": types.ModuleType("dnnlib.util"),
    }
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fakes["dnnlib.util"].EasyDict = EasyDict
    if numpy1:
        fakes["numpy.core.multiarray"] = types.ModuleType("numpy.core.multiarray")
        fakes["numpy.core.multiarray"].scalar = _numpy1_scalar
    saved = {name: sys.modules.get(name, _MISSING) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Pickler(pickle.Pickler):
    """A plain pickler, except: numpy scalars under numpy 1.x's names (``numpy1``), and tensors that share a storage
    written with one storage object (``share_storages``; torch's own reduce writes each tensor's storage anew)."""

    def __init__(self, file: io.BytesIO, protocol: int, numpy1: bool, share_storages: bool) -> None:
        super().__init__(file, protocol=protocol)
        self.numpy1, self.share_storages = numpy1, share_storages
        self.storages: dict[int, Any] = {}

    def reducer_override(self, obj: Any) -> Any:
        if self.numpy1 and isinstance(obj, np.generic):
            return (_numpy1_scalar, (obj.dtype, obj.tobytes()))  # what numpy 1.x's scalar __reduce__ returns
        if self.share_storages and type(obj) is torch.Tensor:
            storage = obj.untyped_storage()
            typed = self.storages.setdefault(
                storage.data_ptr(), torch.TypedStorage(wrap_storage=storage, dtype=obj.dtype, _internal=True)
            )
            args = (typed, obj.storage_offset(), tuple(obj.size()), obj.stride(), obj.requires_grad, OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)
        return NotImplemented


def _module_state(
    module: nn.Module, where: str, names: dict[str, str], kwargs: dict[str, dict], src: str, made: dict[int, Any]
) -> dict[str, Any]:
    state = module.__getstate__()  # the __dict__, as the default __reduce__ gives it
    state["_parameters"] = OrderedDict(state["_parameters"])  # OrderedDicts, as in the torch of NVIDIA's releases
    state["_buffers"] = OrderedDict(state["_buffers"])
    children = state["_modules"].items()
    state["_modules"] = OrderedDict(
        (n, _convert(c, f"{where}.{n}".lstrip("."), names, kwargs, src, made)) for n, c in children
    )
    return state


def _convert(
    module: nn.Module | None, where: str, names: dict[str, str], kwargs: dict[str, dict], src: str, made: dict[int, Any]
) -> Any:
    """``module`` as NVIDIA's pickle holds it: a Persistent (a ModuleDict: an ordinary ModuleDict object) whose
    children are converted too; a module met twice is one object, as pickle's memo makes it."""
    if module is None:
        return None
    if id(module) in made:
        return made[id(module)]
    state = _module_state(module, where, names, kwargs, src, made)
    if isinstance(module, nn.ModuleDict):
        made[id(module)] = plain = nn.ModuleDict.__new__(nn.ModuleDict)
        plain.__dict__.update(state)  # pickled by object's reduce: NEWOBJ(ModuleDict) + BUILD(state)
        return plain
    state["_init_args"], state["_init_kwargs"] = (), dict(kwargs.get(where, {}))  # no deepcopy: it would call a Call
    made[id(module)] = persistent = Persistent(names.get(where, type(module).__name__), state, src)
    return persistent


def snapshot_bytes(
    network: nn.Module,
    class_name: str,
    init_kwargs: dict[str, Any],
    *,
    edm2: bool = False,
    class_names: dict[str, str] | None = None,
    child_kwargs: dict[str, dict] | None = None,
    numpy1: bool = False,
    marker: Path | None = None,
    payload: Call | None = None,
    payload_in_kwargs: bool = False,
    share_storages: bool = False,
    extra: dict[str, Any] | None = None,
    protocol: int = 4,
) -> bytes:
    """A snapshot pickle of ``network`` (the ``ema``) as NVIDIA's EDM (``edm2``: EDM2) training loop writes it.

    ``class_names`` / ``child_kwargs``: a submodule's class name and ``_init_kwargs`` by its dotted name (default: its
    Python class name, no kwargs). ``numpy1``: numpy scalars under numpy 1.x's names. ``marker``: the file that
    ``module_src`` creates if executed. ``payload``: an extra call put first in the top-level dict (or, with
    ``payload_in_kwargs``, inside the network's ``_init_kwargs``). ``extra``: top-level entries added or replaced.
    """
    net = copy.deepcopy(network).eval().requires_grad_(False).cpu()  # as training_loop.py saves its ema
    if edm2:
        net = net.to(torch.float16)  # EDM2 saves every parameter and buffer as fp16
    src = module_source(marker)
    kwargs = {"": dict(init_kwargs), **(child_kwargs or {})}
    if payload is not None and payload_in_kwargs:
        kwargs[""]["payload"] = payload
    ema = _convert(net, "", {"": class_name, **(class_names or {})}, kwargs, src, {})
    top = _top_level(ema, src, edm2)
    if payload is not None and not payload_in_kwargs:
        top = type(top)({"payload": payload, **top})  # first, so that pickle.load would run it before anything else
    top.update(extra or {})
    buffer = io.BytesIO()
    with nvidia_names(numpy1):
        _Pickler(buffer, protocol, numpy1, share_storages).dump(top)
    return buffer.getvalue()


def _top_level(ema: Any, src: str, edm2: bool) -> dict[str, Any]:
    loss = {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
    if not edm2:  # EDM training/training_loop.py
        dataset = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip", use_labels=False)
        return dict(ema=ema, loss_fn=_plain_object("EDMLoss", loss, src), augment_pipe=None, dataset_kwargs=dataset)
    encoder = _plain_object("StandardRGBEncoder", {}, src)  # EDM2 training/training_loop.py, EasyDict then .ema
    dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip", use_labels=True)
    loss = _plain_object("EDM2Loss", {**loss, "P_mean": -0.8, "P_std": 1.6}, src)
    top = EasyDict(encoder=encoder, dataset_kwargs=dataset, loss_fn=loss)
    top.ema = ema
    return top


def _plain_object(class_name: str, attributes: dict[str, Any], src: str) -> Persistent:
    return Persistent(class_name, {"_init_args": (), "_init_kwargs": dict(attributes), **attributes}, src)


def write_snapshot(
    path: Path, network: nn.Module, class_name: str, init_kwargs: dict[str, Any], **options: Any
) -> Path:
    """``snapshot_bytes`` written to ``path``."""
    path = Path(path)
    path.write_bytes(snapshot_bytes(network, class_name, init_kwargs, **options))
    return path


def pickle_with_nvidia_names(obj: Any, protocol: int = 4) -> bytes:
    """``obj`` pickled plainly, with the stand-in modules in place (for hand-made hostile or odd pickles)."""
    with nvidia_names():
        return pickle.dumps(obj, protocol=protocol)
