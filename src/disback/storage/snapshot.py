"""A safe reader of NVIDIA's EDM and EDM2 network snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``,
``edm2-*.pkl``).

A snapshot is a plain pickle of a dict (EDM: ``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``; EDM2: a
``dnnlib.util.EasyDict`` with ``encoder``, ``dataset_kwargs``, ``loss_fn``, ``ema``). Each network in it was saved by
``torch_utils.persistence``: the pickle calls ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=<the Python source of the defining module>, class_name=..., state=
<the module's __dict__>)``, and NVIDIA's loader exec()s ``module_src``, so ``pickle.load`` on a snapshot runs whatever
code the file carries. This reader never does: it unpickles with a ``find_class`` that resolves only the globals a
snapshot uses, each to a small function of ours that builds plain data, and refuses every other global (before
anything is called) and every persistent id. What it allows, and what each becomes:

- ``torch_utils.persistence._reconstruct_persistent_obj``: the recorded class name and state; ``module_src`` is
  never looked at.
- ``collections.OrderedDict``: an ordered dict (no arguments); ``builtins.set``: a set (protocol 2 and 3 writers);
  ``dnnlib.util.EasyDict``: a dict; ``torch.nn.modules.container.ModuleDict`` (``enc``, ``dec``): its recorded state.
- ``torch._utils._rebuild_parameter`` and ``_rebuild_parameter_with_state``: the parameter's data;
  ``torch._utils._rebuild_tensor_v2``: a tensor on the storage at the recorded offset, size and stride (checked to lie
  inside it; tensors that the pickle gives one storage share it).
- ``torch.storage._load_from_bytes``: the legacy ``torch.save`` bytes of one storage, read with
  ``torch.load(weights_only=True)``, never the full unpickle torch itself would use.
- ``numpy.core.multiarray.scalar`` (numpy 1.x writers), ``numpy._core.multiarray.scalar`` (numpy 2.x) and
  ``numpy.dtype``: plain Python numbers (``skip_scale=np.sqrt(0.5)`` in ``_init_kwargs``).

``read_snapshot`` then walks the network's state as ``nn.Module.state_dict()`` does (parameters, persistent buffers,
then submodules, with dotted names) and returns the tensors with the constructor arguments the file records; building
the network from them, defaults included, is the network code's job. Peak memory is about twice the file, as with
``pickle.load``: the pickle's memo keeps each storage's bytes until the load ends.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from disback.errors import DisbackError

# The classes a snapshot's network may be: the preconditioner on top (and its family), the layers inside.
PRECOND_CLASSES: dict[str, str] = {
    "EDMPrecond": "edm",
    "VPPrecond": "edm",
    "VEPrecond": "edm",
    "iDDPMPrecond": "edm",
    "Precond": "edm2",
}
EDM_NETWORK_CLASSES = frozenset(
    {
        "SongUNet",
        "DhariwalUNet",
        "UNetBlock",
        "Linear",
        "Conv2d",
        "GroupNorm",
        "PositionalEmbedding",
        "FourierEmbedding",
    }
)
EDM2_NETWORK_CLASSES = frozenset({"UNet", "Block", "MPConv", "MPFourier"})
NETWORK_CLASSES = EDM_NETWORK_CLASSES | EDM2_NETWORK_CLASSES
INNER_NETWORKS = ("model", "unet")  # where a preconditioner keeps its network: EDM, EDM2

_NUMPY_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_MAX_DEPTH = 100  # deeper than any real network: a cyclic or hostile pickle stops here instead of recursing away
# Real networks have a few thousand modules; a hostile pickle that reuses one module along every path has 2^depth.
_MAX_MODULES = 100_000
_WHAT = "an EDM/EDM2 network snapshot (the network-snapshot-*.pkl that NVIDIA's EDM or EDM2 training code writes)"


class _Refused(Exception):
    """Something a snapshot never holds; read_snapshot adds the file's name and raises a DisbackError."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise _Refused(f"holds {what}, which no EDM/EDM2 snapshot does; nothing in it was run")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_hooks(hooks: Any) -> bool:
    return isinstance(hooks, dict) and not hooks  # hooks are never pickled with a tensor: a filled dict is made up


@dataclass(frozen=True)
class _Persistent:
    """What ``_reconstruct_persistent_obj`` would have rebuilt, as data: the class name and the object's state."""

    class_name: str
    state: dict[str, Any]
    version: int


@dataclass(frozen=True)
class _Storage:
    """One storage read from its bytes; tensors of the pickle that name the same storage share it."""

    data: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


def _reconstruct_persistent_obj(*args: Any) -> _Persistent:
    _expect(len(args) == 1 and isinstance(args[0], dict), "a persistent object rebuilt from other than a meta dict")
    meta = args[0]
    _expect(meta.get("type") == "class", f"a persistent object of type {meta.get('type')!r} (not 'class')")
    name, state, version = meta.get("class_name"), meta.get("state"), meta.get("version")
    _expect(isinstance(name, str) and name.isidentifier(), "a persistent object without a class name")
    _expect(isinstance(state, dict), "a persistent object without a state")
    _expect(_is_int(version) and isinstance(meta.get("module_src"), str), "a persistent object without version/source")
    return _Persistent(name, state, version)  # module_src is dropped unread: running it is what this module avoids


class _OrderedDict(OrderedDict):
    def __new__(cls, *args: Any, **kwargs: Any) -> _OrderedDict:
        _expect(not args and not kwargs, "an OrderedDict built from arguments")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        _expect(False, "an OrderedDict with attributes")


class _EasyDict(dict):
    def __new__(cls, *args: Any, **kwargs: Any) -> _EasyDict:
        _expect(not args and not kwargs, "an EasyDict built from arguments")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        _expect(False, "an EasyDict with attributes")


class _ModuleDict:
    """A ``torch.nn.ModuleDict`` (pickled as an ordinary object: NEWOBJ, then BUILD with its state)."""

    class_name = "ModuleDict"

    def __new__(cls, *args: Any, **kwargs: Any) -> _ModuleDict:
        _expect(not args and not kwargs, "a ModuleDict built from arguments")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        _expect(isinstance(state, dict) and not hasattr(self, "state"), "a ModuleDict with an unexpected state")
        self.state = state


class _NumpyDtype:
    """``numpy.dtype(code, align, copy)`` followed by its BUILD state, for a scalar's type and byte order."""

    def __init__(self, *args: Any) -> None:
        ok = 1 <= len(args) <= 3 and isinstance(args[0], str) and args[0] in _NUMPY_CODES
        _expect(ok, f"a numpy dtype {args[:1]!r} other than a number's")
        self.code, self.order = args[0], "="

    def __setstate__(self, state: Any) -> None:
        ok = isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
        _expect(ok and state[2] is None and state[3] is None and state[4] is None, "a structured numpy dtype")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


def _numpy_scalar(*args: Any) -> bool | int | float | complex:
    _expect(len(args) == 2 and isinstance(args[0], _NumpyDtype) and isinstance(args[1], bytes), "a numpy object")
    dtype = args[0].numpy()
    _expect(len(args[1]) == dtype.itemsize, "a numpy scalar of the wrong size")
    return np.frombuffer(args[1], dtype=dtype)[0].item()  # a plain Python number: nothing numpy-typed leaks out


def _load_from_bytes(*args: Any) -> _Storage:
    _expect(len(args) == 1 and isinstance(args[0], bytes), "a storage that is not bytes")
    try:  # legacy torch.save bytes of one storage: torch's own weights-only reader allows nothing but storages
        storage = torch.load(io.BytesIO(args[0]), weights_only=True, map_location="cpu")
    except Exception as exc:  # every way of failing means the same: this storage cannot be read
        # Only the type: torch's text advises weights_only=False, the one thing never to do with this file.
        raise _Refused(
            f"has a tensor storage that torch's weights-only reader cannot read ({type(exc).__name__}); the file is "
            "damaged or was not written by NVIDIA's EDM/EDM2 code"
        ) from None
    _expect(isinstance(storage, torch.TypedStorage), f"a storage that reads as a {type(storage).__name__}")
    data, dtype = storage._untyped_storage, storage.dtype
    return _Storage(data, dtype, data.nbytes() // dtype.itemsize)


def _rebuild_tensor_v2(*args: Any) -> torch.Tensor:
    _expect(len(args) in (6, 7) and isinstance(args[0], _Storage), "a tensor built from something else than a storage")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    metadata = args[6] if len(args) == 7 else None
    _expect(_is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple), "a bad tensor")
    _expect(len(size) == len(stride) and all(_is_int(n) and n >= 0 for n in size + stride), "a bad tensor shape")
    _expect(isinstance(requires_grad, bool) and _no_hooks(hooks) and not metadata, "a tensor with hooks or metadata")
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    # set_() would silently grow the storage to fit: an extent past its end is refused, never read.
    _expect(end <= storage.numel, f"a tensor reaching element {end} of a storage of {storage.numel}")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.data, offset, size, stride)


def _rebuild_parameter(*args: Any) -> torch.Tensor:
    _expect(len(args) == 3 and isinstance(args[0], torch.Tensor) and _no_hooks(args[2]), "a parameter without data")
    return args[0]


def _rebuild_parameter_with_state(*args: Any) -> torch.Tensor:
    _expect(len(args) == 4 and isinstance(args[3], (dict, tuple, type(None))), "a parameter with an odd state")
    return _rebuild_parameter(*args[:3])  # the state holds Python attributes of the Parameter object: not weights


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): _OrderedDict,
    ("builtins", "set"): set,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDtype,
}


class _SnapshotUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED``; the base class's find_class (which imports and returns anything) is never used."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(
                f"asks for the global {_show(f'{module}.{name}')}, which no EDM/EDM2 snapshot uses; it was refused "
                "before anything in the file ran. Read only snapshots that NVIDIA's EDM/EDM2 training code wrote"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"uses a persistent id ({type(pid).__name__}), which no EDM/EDM2 snapshot does")


@dataclass(frozen=True)
class PersistentObject:
    """A non-network object of a snapshot (``loss_fn``, ``augment_pipe``, EDM2's ``encoder``), as data."""

    class_name: str
    init_kwargs: dict[str, Any]
    attributes: dict[str, Any]  # its public attributes (e.g. EDMLoss: P_mean, P_std, sigma_data)


@dataclass
class Snapshot:
    """What an EDM/EDM2 snapshot records about its network, read without running anything."""

    file: Path
    family: str  # "edm" or "edm2"
    class_name: str  # the preconditioner: EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, or EDM2's Precond
    model_type: str  # the network inside it: SongUNet, DhariwalUNet, UNet
    init_kwargs: dict[str, Any]  # the preconditioner's constructor kwargs as passed (defaults are not recorded)
    state: OrderedDict[str, torch.Tensor] = field(repr=False)  # exactly what the network's state_dict() gives
    other_keys: dict[str, Any] = field(default_factory=dict)  # the snapshot's other entries (loss_fn, dataset_kwargs..)
    attributes: dict[str, Any] = field(default_factory=dict)  # the preconditioner's public attributes (sigma_min..)


def read_snapshot(path: Path | str, key: str = "ema") -> Snapshot:
    """The network under ``key`` of the EDM/EDM2 snapshot ``path``: its tensors (as ``state_dict()`` would give them)
    and what the file records about it. Nothing the file carries is executed; any global or structure a snapshot
    does not use is refused with a DisbackError naming it."""
    path = Path(path)
    top = _unpickle(path)
    try:
        return _snapshot(path, top, key)
    except _Refused as exc:
        raise DisbackError(f"{path} {exc}") from None
    except DisbackError:
        raise
    except Exception as exc:  # a hostile structure the checks did not foresee (an unhashable set member...)
        raise _damaged(path, exc) from None


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DisbackError(f"snapshot {path} does not exist (or is not a file); give {_WHAT}")
    with path.open("rb") as fh:
        head = fh.peek(2)[:2]  # peek: the file is read once, by the unpickler
        if not head:
            raise DisbackError(f"{path} is empty, not {_WHAT}; download it again")
        if head != b"\x80" and (head[0] != 0x80 or head[1] not in (2, 3, 4, 5)):  # (a lone PROTO byte: truncated)
            raise DisbackError(f"{path} is not a pickle (it starts with {head!r}), so it is not {_WHAT}")
        try:
            return _SnapshotUnpickler(fh).load()
        except _Refused as exc:
            raise DisbackError(f"{path} {exc}") from None
        except Exception as exc:  # a damaged pickle fails in many ways (KeyError, ValueError...): none escapes raw
            raise _damaged(path, exc) from None


def _damaged(path: Path, exc: Exception) -> DisbackError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text:
        return DisbackError(f"{path} is truncated: the file ends before the pickle does ({text}); download it again")
    return DisbackError(f"{path} is a damaged pickle ({type(exc).__name__}: {text[:200]}), not {_WHAT}")


def _snapshot(path: Path, top: Any, key: str) -> Snapshot:
    if not isinstance(top, dict):
        raise DisbackError(f"{path} holds {_describe(top)}, not {_WHAT}: a dict with an {key!r} network")
    if key not in top:
        keys = ", ".join(repr(k) for k in list(top)[:8]) or "none"
        raise DisbackError(f"{path} has no {key!r} entry (its keys: {keys}), so it is not {_WHAT}")
    net = top[key]
    if not isinstance(net, _Persistent):
        raise DisbackError(
            f"{path}: its {key!r} is {_describe(net)}, not a network saved by NVIDIA's torch_utils.persistence, so "
            f"the file is not {_WHAT}"
        )
    if net.class_name not in PRECOND_CLASSES:
        raise DisbackError(
            f"{path}: its {key!r} network is of class {net.class_name}, not one of the preconditioners disback knows "
            f"({', '.join(PRECOND_CLASSES)})"
        )
    init_kwargs = _plain(net.state.get("_init_kwargs", {}))
    if not isinstance(init_kwargs, dict):
        raise DisbackError(f"{path}: its {key!r} network records _init_kwargs as {_describe(init_kwargs)}, not a dict")
    state = _collect(path, net, key)
    return Snapshot(
        file=path,
        family=PRECOND_CLASSES[net.class_name],
        class_name=net.class_name,
        model_type=_model_type(path, net, init_kwargs),
        init_kwargs=init_kwargs,
        state=state,
        other_keys={k: _plain(v) for k, v in top.items() if k != key},
        attributes=_attributes(net.state),
    )


def _collect(path: Path, net: _Persistent, key: str) -> OrderedDict[str, torch.Tensor]:
    """``net``'s tensors in ``state_dict()``'s order: each module's parameters, then its persistent buffers, then its
    submodules' under ``name.``."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    todo: list[tuple[str, Any, int]] = [("", net, 0)]  # a stack, children pushed in reverse: depth-first, in order
    visits = 0
    while todo:
        prefix, node, depth = todo.pop()
        visits += 1
        if depth > _MAX_DEPTH or visits > _MAX_MODULES:  # a cyclic or hostile pickle stops here
            raise DisbackError(
                f"{path}: its {key!r} network nests too deep or too wide at {prefix!r}; the file is damaged"
            )
        params, buffers, modules, skip = _module_parts(path, node, _show(f"{key}.{prefix}".rstrip(".")))
        for kind, tensors in (("parameter", params), ("buffer", buffers)):
            for name, tensor in tensors.items():
                if tensor is None or (kind == "buffer" and name in skip):
                    continue
                if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                    raise DisbackError(f"{path}: {_show(f'{key}.{prefix}{name}')} is a {kind} that is not a tensor")
                out[prefix + name] = tensor.detach()  # as state_dict(): no grad, the same storage
        children = [(name, child) for name, child in modules.items() if child is not None]
        for name, child in children:
            _check_child(path, _show(f"{key}.{prefix}{name}"), child, name)
        todo.extend((f"{prefix}{name}.", child, depth + 1) for name, child in reversed(children))
    return out


def _module_parts(path: Path, node: Any, where: str) -> tuple[dict, dict, dict, set]:
    state = node.state if isinstance(node, (_Persistent, _ModuleDict)) and hasattr(node, "state") else None
    parts = [state.get(n) if isinstance(state, dict) else None for n in ("_parameters", "_buffers", "_modules")]
    skip = state.get("_non_persistent_buffers_set", set()) if isinstance(state, dict) else None
    if not all(isinstance(p, dict) for p in parts) or not isinstance(skip, (set, frozenset)):
        raise DisbackError(f"{path}: {where} ({_describe(node)}) has no module state (_parameters, _buffers, _modules)")
    return parts[0], parts[1], parts[2], skip


def _check_child(path: Path, where: str, child: Any, name: Any) -> None:
    if isinstance(child, _Persistent) and child.class_name not in NETWORK_CLASSES:
        raise DisbackError(
            f"{path}: {where} is of class {child.class_name}, not one of the EDM/EDM2 network classes disback knows "
            f"({', '.join(sorted(NETWORK_CLASSES))}); nothing in the file was run"
        )
    if not isinstance(child, (_Persistent, _ModuleDict)) or not isinstance(name, str):
        raise DisbackError(f"{path}: {where} is {_describe(child)} under a {type(name).__name__} name, not a module")


def _model_type(path: Path, net: _Persistent, init_kwargs: dict[str, Any]) -> str:
    modules = net.state.get("_modules") or {}
    inner = next((modules[n] for n in INNER_NETWORKS if isinstance(modules.get(n), _Persistent)), None)
    recorded, found = init_kwargs.get("model_type"), inner.class_name if inner is not None else None
    if recorded is not None and not isinstance(recorded, str):
        raise DisbackError(f"{path}: its {net.class_name} records model_type={recorded!r}, not a class name")
    if recorded is not None and found is not None and recorded != found:
        raise DisbackError(f"{path}: its {net.class_name} records model_type={recorded!r} but holds a {found}")
    if (found or recorded) is None:
        raise DisbackError(f"{path}: its {net.class_name} holds no network ({' or '.join(INNER_NETWORKS)})")
    return found or recorded


def _attributes(state: dict[str, Any], depth: int = 0, seen: dict[int, Any] | None = None) -> dict[str, Any]:
    public = (k for k in state if isinstance(k, str) and not k.startswith("_") and k != "training")
    return {k: _plain(state[k], depth, seen) for k in public}


def _plain(value: Any, depth: int = 0, seen: dict[int, Any] | None = None) -> Any:
    """``value`` with the reader's stand-ins made plain: dicts (EasyDict, OrderedDict) as dict, persistent objects as
    PersistentObject; lists, tuples, numbers, strings and tensors as they are. A value the pickle shares is converted
    once (``seen``), so a hostile pickle that reuses one list at every level costs nothing."""
    _expect(depth <= _MAX_DEPTH, "values nested deeper than any snapshot's")
    seen = {} if seen is None else seen
    if id(value) in seen:
        return seen[id(value)]
    if isinstance(value, _Persistent):
        kwargs = _plain(value.state.get("_init_kwargs", {}), depth + 1, seen)
        attributes = _attributes(value.state, depth + 1, seen)
        result: Any = PersistentObject(value.class_name, kwargs if isinstance(kwargs, dict) else {}, attributes)
    elif isinstance(value, _ModuleDict):
        result = PersistentObject(_ModuleDict.class_name, {}, {})
    elif isinstance(value, dict):
        result = {k: _plain(v, depth + 1, seen) for k, v in value.items()}
    elif isinstance(value, (list, tuple, set, frozenset)):
        result = type(value)(_plain(v, depth + 1, seen) for v in value)
    else:
        return value
    seen[id(value)] = result  # value stays alive (the unpickled tree holds it), so its id is not reused meanwhile
    return result


def _show(text: str) -> str:
    """A name from the file, fit for a one-line message: as it is when printable and short, else its repr."""
    return text if text.isprintable() and len(text) <= 200 else repr(text[:200])


def _describe(value: Any) -> str:
    if isinstance(value, _Persistent):
        return f"a persistent {value.class_name}"
    if isinstance(value, _ModuleDict):
        return "a ModuleDict"
    return f"a {'dict' if isinstance(value, dict) else type(value).__name__}"
