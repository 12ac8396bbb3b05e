"""The safe reader of EDM/EDM2 snapshot pickles: it returns exactly what ``state_dict()`` gives and the recorded
constructor arguments, runs nothing the file carries, and turns every bad file into one DisbackError line."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import random
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from disback.errors import DisbackError
from disback.storage.snapshot import PersistentObject, Snapshot, read_snapshot
from snapshot_writer import Call, Persistent, module_source, pickle_with_nvidia_names, snapshot_bytes, write_snapshot

# Stand-ins named like EDM's and EDM2's classes (the real networks are written elsewhere): plain torch layers inside.


class UNetBlock(nn.Module):
    def __init__(self, channels: int, emb: int) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(2, channels)
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine = nn.Linear(emb, channels, bias=False)  # a None parameter: no key
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))
        self.register_buffer("window", torch.arange(24.0).reshape(4, 6)[1:, ::2])  # a view: offset 6, stride (6, 2)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in state_dict()
        self.register_buffer("absent", None)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.skip = None


class SongUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.map_layer0 = nn.Linear(4, 8)
        self.enc = nn.ModuleDict({"8x8_conv": nn.Conv2d(3, 4, 3, padding=1), "8x8_block0": UNetBlock(4, 8)})
        self.dec = nn.ModuleDict({"8x8_aux_norm": nn.GroupNorm(2, 4)})
        self.dec["8x8_tied"] = self.enc["8x8_conv"]  # one module under two names: its tensors are shared


class EDMPrecond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = 8, 3, 0, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), 0.5
        self.model = SongUNet()


class MPConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))


class MPFourier(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels))
        self.register_buffer("phases", torch.rand(channels))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.emb_gain = nn.Parameter(torch.tensor(0.25))  # 0-dim
        self.conv_res0 = MPConv(channels, channels, (3, 3))


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_gain = nn.Parameter(torch.tensor(0.5))
        self.emb_fourier = MPFourier(8)
        self.enc = nn.ModuleDict({"8x8_conv": MPConv(4, 4, (3, 3)), "8x8_block0": Block(4)})
        self.dec = nn.ModuleDict({"8x8_in0": Block(4)})
        self.out_conv = MPConv(4, 3, (3, 3))


class Precond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16, self.sigma_data = 8, 3, 0, True, 0.5
        self.unet = UNet()
        self.logvar_fourier = MPFourier(8)
        self.logvar_linear = MPConv(8, 1, ())


EDM_KWARGS = {
    "img_resolution": 8,
    "img_channels": 3,
    "label_dim": 0,
    "use_fp16": False,
    "model_type": "SongUNet",
    "channel_mult": [1, 2],
    "attn_resolutions": (4,),
    "dropout": np.float64(0.13),
}
BLOCK_KWARGS = {"skip_scale": np.sqrt(0.5), "init_attn": {"init_weight": np.sqrt(0.2)}, "eps": 1e-6}


def _edm(tmp_path: Path, name: str = "network-snapshot-000100.pkl", **options) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = EDMPrecond()
    options.setdefault("child_kwargs", {"model.enc.8x8_block0": BLOCK_KWARGS})
    return write_snapshot(tmp_path / name, net, "EDMPrecond", EDM_KWARGS, **options), net


def _edm2(tmp_path: Path, **options) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    net = Precond()
    kwargs = {"img_resolution": 8, "img_channels": 3, "label_dim": 0, "model_channels": 4, "dropout": 0.0}
    return write_snapshot(tmp_path / "edm2-img8-xs.pkl", net, "Precond", kwargs, edm2=True, **options), net


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)  # the same keys in the same order
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key
        assert not got[key].requires_grad


def _globals_in(data: bytes) -> set[str]:
    """The globals a protocol-4 pickle names (module and name are the two strings pushed just before STACK_GLOBAL)."""
    memo: list[object] = []
    pushed: list[object] = []
    found: set[str] = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"):
            pushed.append(arg)
        elif op.name == "MEMOIZE":
            memo.append(pushed[-1] if pushed else None)
        elif op.name in ("BINGET", "LONG_BINGET"):
            pushed.append(memo[arg])
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        else:
            pushed.append(None)
    return found


def _globals_in_any(data: bytes) -> set[str]:
    """The globals a protocol 0-3 pickle names (GLOBAL opcodes)."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _error(path: Path, match: str = "", key: str = "ema") -> str:
    with pytest.raises(DisbackError) as info:
        read_snapshot(path, key=key)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    assert match in message, message
    return message


# What is read.


def test_edm_snapshot_reads_exactly_the_state_dict_and_the_recorded_arguments(tmp_path):
    path, net = _edm(tmp_path)
    snap = read_snapshot(path)
    assert isinstance(snap, Snapshot) and snap.file == path
    _assert_same_state(snap.state, net.state_dict())
    assert "model.enc.8x8_block0.affine.bias" not in snap.state and "model.enc.8x8_block0.scratch" not in snap.state
    assert (snap.family, snap.class_name, snap.model_type) == ("edm", "EDMPrecond", "SongUNet")
    assert snap.init_kwargs == {**EDM_KWARGS, "dropout": 0.13}
    assert type(snap.init_kwargs["dropout"]) is float  # numpy made plain
    assert type(snap.init_kwargs["channel_mult"]) is list and type(snap.init_kwargs["attn_resolutions"]) is tuple
    assert snap.attributes["sigma_data"] == 0.5 and snap.attributes["sigma_max"] == float("inf")
    assert list(snap.other_keys) == ["loss_fn", "augment_pipe", "dataset_kwargs"]
    loss = snap.other_keys["loss_fn"]
    assert isinstance(loss, PersistentObject) and loss.class_name == "EDMLoss" and loss.attributes["P_std"] == 1.2
    assert snap.other_keys["augment_pipe"] is None
    assert snap.other_keys["dataset_kwargs"]["class_name"] == "training.dataset.ImageFolderDataset"
    assert "tensor(" not in repr(snap)  # a 2 GB state is not printed


def test_the_writer_names_the_globals_nvidia_snapshots_use(tmp_path):
    path, _ = _edm(tmp_path)
    assert _globals_in(path.read_bytes()) == {
        "torch_utils.persistence._reconstruct_persistent_obj",
        "collections.OrderedDict",
        "torch.nn.modules.container.ModuleDict",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_tensor_v2",
        "torch.storage._load_from_bytes",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
    }
    path2, _ = _edm2(tmp_path)
    assert "dnnlib.util.EasyDict" in _globals_in(path2.read_bytes())
    assert path.read_bytes().count(b"Stands in for training/networks.py") == 1  # module_src is written once (memo)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules  # the writer's stand-ins are gone


def test_views_keep_their_offset_and_stride_and_tied_tensors_share_storage(tmp_path):
    path, net = _edm(tmp_path)
    state = read_snapshot(path).state
    window = state["model.enc.8x8_block0.window"]
    assert window.storage_offset() == 6 and window.stride() == (6, 2) and window.shape == (3, 3)
    assert window.untyped_storage().nbytes() == 24 * 4  # the whole base storage is in the file
    assert torch.equal(window, net.model.enc["8x8_block0"].window)
    tied, conv = state["model.dec.8x8_tied.weight"], state["model.enc.8x8_conv.weight"]
    assert tied.untyped_storage().data_ptr() == conv.untyped_storage().data_ptr()


@pytest.mark.parametrize("share", [False, True])
def test_tensors_that_the_pickle_gives_one_storage_share_it(tmp_path, share):
    class EDMPrecond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(10.0)
            self.register_buffer("whole", base)
            self.register_buffer("tail", base[4:].view(2, 3))
            self.model = SongUNet()

    net = EDMPrecond()
    path = write_snapshot(tmp_path / "shared.pkl", net, "EDMPrecond", {"model_type": "SongUNet"}, share_storages=share)
    state = read_snapshot(path).state
    _assert_same_state(state, net.state_dict())
    same = state["whole"].untyped_storage().data_ptr() == state["tail"].untyped_storage().data_ptr()
    assert same == share  # torch's own reduce writes each tensor's storage anew; one storage object stays one
    assert state["tail"].storage_offset() == 4


def test_edm2_snapshot_is_an_easydict_of_fp16_tensors(tmp_path):
    path, net = _edm2(tmp_path)
    snap = read_snapshot(path)
    _assert_same_state(snap.state, net.half().state_dict())
    assert all(t.dtype == torch.float16 for t in snap.state.values())
    assert snap.state["unet.enc.8x8_block0.emb_gain"].shape == ()
    assert (snap.family, snap.class_name, snap.model_type) == ("edm2", "Precond", "UNet")
    assert snap.init_kwargs["model_channels"] == 4
    assert list(snap.other_keys) == ["encoder", "dataset_kwargs", "loss_fn"]
    assert type(snap.other_keys["dataset_kwargs"]) is dict  # an EasyDict, made a plain dict
    assert snap.other_keys["encoder"].class_name == "StandardRGBEncoder"
    assert snap.other_keys["loss_fn"].attributes["P_mean"] == -0.8


@pytest.mark.parametrize("numpy1", [False, True])
def test_numpy_scalars_under_numpy1_and_numpy2_names_become_plain_numbers(tmp_path, numpy1):
    path, _ = _edm(tmp_path, numpy1=numpy1)
    data = path.read_bytes()
    assert (b"numpy.core.multiarray" in data) == numpy1 and (b"numpy._core.multiarray" in data) != numpy1
    snap = read_snapshot(path)
    assert type(snap.init_kwargs["dropout"]) is float and snap.init_kwargs["dropout"] == 0.13
    assert len(snap.state) == len(EDMPrecond().state_dict())  # UNetBlock's own kwargs (np.sqrt(0.5)) read as well


def test_protocol_3_pickles_with_sets_by_name(tmp_path):
    path, net = _edm(tmp_path, protocol=3)  # no EMPTY_SET opcode before protocol 4: builtins.set is named
    assert "builtins.set" in _globals_in_any(path.read_bytes())
    _assert_same_state(read_snapshot(path).state, net.state_dict())


def test_numpy_scalars_of_other_types_and_byte_orders(tmp_path):
    values = {"i": np.int64(-3), "u": np.uint8(200), "b": np.bool_(True), "h": np.float16(0.5), "f": np.float32(0.25)}
    scalar = np.float64(0).__reduce__()[0]  # numpy's own scalar function, under this numpy's module name
    values["big"] = Call(scalar, np.dtype(">f8"), np.array([1.5], dtype=">f8").tobytes())  # a big-endian writer's
    path, _ = _edm(tmp_path, extra={"dataset_kwargs": values})
    got = read_snapshot(path).other_keys["dataset_kwargs"]
    assert got == {"i": -3, "u": 200, "b": True, "h": 0.5, "f": 0.25, "big": 1.5}
    assert [type(v) for v in got.values()] == [int, int, bool, float, float, float]


def test_a_parameter_with_python_attributes_is_read_as_its_data(tmp_path):
    weight = nn.Parameter(torch.randn(3, 2))
    weight.note = "ema"  # torch then pickles it with _rebuild_parameter_with_state
    path, _ = _edm(tmp_path, extra={"dataset_kwargs": {"weight": weight}})
    assert "torch._utils._rebuild_parameter_with_state" in _globals_in(path.read_bytes())
    got = read_snapshot(path).other_keys["dataset_kwargs"]["weight"]
    assert type(got) is torch.Tensor and torch.equal(got, weight.detach())


# Nothing runs.


def _write_file(path: str) -> None:
    Path(path).write_text("the payload ran")


def test_module_src_never_runs_and_pickle_load_is_never_used(tmp_path, monkeypatch):
    marker = tmp_path / "module_src_ran"
    edm, _ = _edm(tmp_path, marker=marker)
    edm2, _ = _edm2(tmp_path, marker=marker)
    calls = []

    def reconstruct(meta):  # what NVIDIA's _reconstruct_persistent_obj does first: run the module's source
        calls.append(meta["class_name"])
        exec(compile(meta["module_src"], "<module_src>", "exec"), {})
        return meta

    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = reconstruct
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__init__": lambda self, *a: calls.append("EasyDict")})
    for name, module in {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle.load/loads was called on a snapshot")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    real_torch_load = torch.load

    def torch_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, kwargs  # storages are read by torch's weights-only reader
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    assert read_snapshot(edm).model_type == "SongUNet"
    assert read_snapshot(edm2).model_type == "UNet"
    assert not marker.exists() and calls == []


def test_the_trap_is_real_pickle_load_would_run_module_src(tmp_path, monkeypatch):
    """The written snapshot is what NVIDIA's loader executes: with a stand-in persistence module that does what the
    real one does, plain pickle.loads runs module_src (which is why the reader never uses it)."""
    marker = tmp_path / "ran"
    data = snapshot_bytes(EDMPrecond(), "EDMPrecond", {"model_type": "SongUNet"}, marker=marker)
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = lambda meta: exec(meta["module_src"], {})
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    pickle.loads(data)
    assert marker.read_text() == "module_src was executed"
    assert module_source(marker).count(str(marker)) == 1


@pytest.mark.parametrize("in_kwargs", [False, True])
@pytest.mark.parametrize(
    "kind, named",
    [("system", "posix.system"), ("exec", "builtins.exec"), ("function", "test_snapshot._write_file")],
)
def test_a_snapshot_carrying_a_callable_is_refused_and_nothing_runs(tmp_path, kind, named, in_kwargs):
    marker = tmp_path / f"payload-{kind}"
    payload = {
        "system": Call(os.system, f"touch {marker}"),
        "exec": Call(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"),
        "function": Call(_write_file, str(marker)),
    }[kind]
    path, _ = _edm(tmp_path, payload=payload, payload_in_kwargs=in_kwargs)
    message = _error(path, named)
    assert "refused" in message
    assert not marker.exists()


# Bad files, each one DisbackError line naming the file.


def test_missing_empty_random_and_non_pickle_files(tmp_path):
    _error(tmp_path / "absent.pkl", "does not exist")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    _error(empty, "empty")
    rng = random.Random(0)
    noise = tmp_path / "noise.pkl"
    noise.write_bytes(b"\x7f" + rng.randbytes(4095))
    _error(noise, "not a pickle")
    text = tmp_path / "readme.pkl"
    text.write_text("version https://git-lfs.github.com/spec/v1\n")  # e.g. a Git LFS pointer instead of the file
    _error(text, "not a pickle")
    for seed in range(20):  # noise behind a valid pickle header: damaged, truncated or refused, never a raw error
        noisy = tmp_path / f"noisy-{seed}.pkl"
        noisy.write_bytes(b"\x80\x04" + random.Random(seed).randbytes(2048))
        _error(noisy)


def test_truncated_files(tmp_path):
    path, _ = _edm(tmp_path)
    data = path.read_bytes()
    for cut in (1, 2, 3, 40, len(data) // 4, len(data) // 2, len(data) - 2, len(data) - 1):
        short = tmp_path / f"cut-{cut}.pkl"
        short.write_bytes(data[:cut])
        _error(short, "truncated")


def test_pickles_that_are_not_snapshots(tmp_path):
    cases = {
        "plain-dict.pkl": (pickle.dumps({"weights": [1, 2, 3]}), "no 'ema'"),
        "list.pkl": (pickle.dumps([1, 2]), "holds a list"),
        "ema-dict.pkl": (pickle.dumps({"ema": {"model.weight": 1}}), "not a network saved by"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        _error(tmp_path / name, match)
    path, _ = _edm(tmp_path)
    _error(path, "no 'net'", key="net")


def test_unknown_network_classes_are_named(tmp_path):
    data = snapshot_bytes(EDMPrecond(), "MysteryPrecond", {})
    (tmp_path / "mystery.pkl").write_bytes(data)
    _error(tmp_path / "mystery.pkl", "MysteryPrecond")
    evil, _ = _edm(tmp_path, name="evil.pkl", class_names={"model.enc.8x8_block0": "EvilBlock"})
    _error(evil, "ema.model.enc.8x8_block0 is of class EvilBlock")
    wrong, _ = _edm(tmp_path, name="wrong.pkl", class_names={"model": "DhariwalUNet"})
    _error(wrong, "model_type='SongUNet' but holds a DhariwalUNet")


def test_unexpected_globals_and_shapes_are_refused(tmp_path):
    path, _ = _edm(tmp_path, name="array.pkl", extra={"dataset_kwargs": {"mean": np.zeros(3)}})
    _error(path, "numpy._core.multiarray._reconstruct")

    class Referenced(pickle.Pickler):
        def persistent_id(self, obj):
            return "elsewhere" if obj == "external" else None

    import io

    buffer = io.BytesIO()
    Referenced(buffer, protocol=4).dump({"ema": "external"})
    (tmp_path / "persid.pkl").write_bytes(buffer.getvalue())
    _error(tmp_path / "persid.pkl", "persistent id")

    meta = Persistent("EDMPrecond", {}, "source")
    meta.meta["type"] = "function"
    storage = torch.arange(4.0).untyped_storage()
    typed = torch.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    cases = {
        "meta-type.pkl": ({"ema": meta}, "persistent object of type 'function'"),
        "odict-args.pkl": ({"ema": Call(OrderedDict, [("a", 1)])}, "OrderedDict built from arguments"),
        "out-of-bounds.pkl": (
            {"ema": Call(torch._utils._rebuild_tensor_v2, typed, 2, (4,), (1,), False, OrderedDict())},
            "tensor reaching element 6 of a storage of 4",
        ),
        "hooked.pkl": (
            {"ema": Call(torch._utils._rebuild_tensor_v2, typed, 0, (4,), (1,), False, OrderedDict(a=1))},
            "hooks",
        ),
        "bad-storage.pkl": ({"ema": Call(torch.storage._load_from_bytes, b"not a storage")}, "cannot read"),
        "moduledict-args.pkl": ({"ema": Call(nn.ModuleDict, {"a": 1})}, "ModuleDict built from arguments"),
    }
    for name, (obj, match) in cases.items():
        (tmp_path / name).write_bytes(pickle_with_nvidia_names(obj))
        _error(tmp_path / name, match)


def test_a_module_reused_along_every_path_stops_instead_of_exploding(tmp_path):
    def module(class_name: str, children: dict) -> Persistent:
        state = {"_parameters": {}, "_buffers": {}, "_non_persistent_buffers_set": set(), "_modules": children}
        return Persistent(class_name, state, "source")

    node = module("Linear", {})
    for _ in range(40):  # 2^40 paths through 41 objects: state_dict() would never finish
        node = module("UNetBlock", {"a": node, "b": node})
    path = tmp_path / "wide.pkl"
    path.write_bytes(pickle_with_nvidia_names({"ema": module("EDMPrecond", {"model": node})}))
    _error(path, "too deep or too wide")
