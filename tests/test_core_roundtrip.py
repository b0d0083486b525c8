"""Single-process save/load round trips: bit-exact tensors, in-place loads, values, modules.

Everything runs against real checkpoints under ``tmp_path``; no torch.distributed.
Float tensors are compared byte for byte (``.view(torch.uint8)``) so that NaN
payloads and ``-0.0`` count.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import async_ckpt as ac
from async_ckpt.testing import assert_bits_equal, raw_bytes

MiB = 1 << 20
BLOCK = 4 * MiB  # the default checksum block size

_DTYPE_NAMES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "complex64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]
DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)]


# ---------------------------------------------------------------- helpers


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs, infinities, -0.0 included for floats)."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return data.view(dtype).reshape(shape).clone()


def zeros_like_target(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype)


def values_equal(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and tells -0.0 from 0.0, and checks types."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))
    return bool(a == b)


# ---------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_round_trips_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    saved = {
        "scalar": random_tensor(dtype, (), seed=1),
        "vec": random_tensor(dtype, (37,), seed=2),
        "mat": random_tensor(dtype, (5, 7), seed=3),
        "cube": random_tensor(dtype, (2, 3, 4), seed=4),
        "empty": torch.empty((0,), dtype=dtype),
        "empty2d": torch.empty((0, 3), dtype=dtype),
    }
    expected = {k: v.clone() for k, v in saved.items()}
    md = ac.save(saved, tmp_path / "ckpt")
    assert set(md.tensors) == set(saved)
    for fqn, t in saved.items():
        assert md.tensors[fqn].dtype == dtype
        assert md.tensors[fqn].shape == tuple(t.shape)

    target = {k: zeros_like_target(v) for k, v in saved.items()}
    before = dict(target)
    ac.load(target, tmp_path / "ckpt")
    for fqn, t in expected.items():
        assert target[fqn] is before[fqn], fqn
        assert_bits_equal(target[fqn], t, fqn)
    # The source was not disturbed by saving.
    for fqn, t in expected.items():
        assert_bits_equal(saved[fqn], t, fqn)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_float_special_values_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    t = torch.tensor(
        [math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, -1.0, 1e-40, 3.0e38], dtype=torch.float64
    ).to(dtype)
    # A NaN with a non-default payload survives only if bytes are copied verbatim.
    payload_nan = {
        torch.float64: (torch.int64, 0x7FF0_0000_0000_0123),
        torch.float32: (torch.int32, 0x7FC1_2345),
        torch.float16: (torch.int16, 0x7E01),
        torch.bfloat16: (torch.int16, 0x7FC1),
    }[dtype]
    t = torch.cat([t, torch.tensor([payload_nan[1]], dtype=payload_nan[0]).view(dtype)])
    assert math.isnan(t[-1].item())
    ac.save({"t": t}, tmp_path / "c")
    out = {"t": torch.zeros_like(t)}
    ac.load(out, tmp_path / "c")
    assert_bits_equal(out["t"], t)
    assert math.copysign(1.0, out["t"][4].item()) == -1.0  # -0.0 kept its sign


# ---------------------------------------------------------------- containers and in-place load


def _nested_source() -> dict[str, Any]:
    return {
        "model": {
            "layers": [
                {"w": torch.randn(4, 3), "b": torch.randn(4)},
                {"w": torch.randn(2, 4), "b": torch.randn(2)},
            ],
            "embed": torch.randn(10, 3),
        },
        "pair": (torch.arange(5, dtype=torch.int64), torch.tensor([True, False, True])),
        "deep": [[[torch.randn(2)]], ({"x": torch.randn(3, dtype=torch.float64)},)],
        3: {"int_key": torch.randn(2, dtype=torch.bfloat16)},
        "step": 17,
    }


def _zero_copy(node: Any) -> Any:
    if isinstance(node, torch.Tensor):
        return zeros_like_target(node)
    if isinstance(node, dict):
        return {k: _zero_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_zero_copy(v) for v in node]
    if isinstance(node, tuple):
        return tuple(_zero_copy(v) for v in node)
    return None


def _tensor_objects(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(node, torch.Tensor):
        out[prefix] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            out.update(_tensor_objects(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out.update(_tensor_objects(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def test_nested_containers_round_trip(tmp_path: Path) -> None:
    src = _nested_source()
    ac.save(src, tmp_path / "ckpt")
    target = _zero_copy(src)
    ac.load(target, tmp_path / "ckpt")
    assert values_equal(target, src)
    assert isinstance(target["pair"], tuple)
    assert isinstance(target["deep"][1], tuple)
    assert isinstance(target["deep"][0], list)


def test_load_is_in_place(tmp_path: Path) -> None:
    src = _nested_source()
    ac.save(src, tmp_path / "ckpt")
    target = _zero_copy(src)
    tensors_before = _tensor_objects(target)
    model_dict = target["model"]
    layers_list = target["model"]["layers"]
    layer0 = target["model"]["layers"][0]
    deep_list = target["deep"]
    inner = target["deep"][1][0]
    int_key_dict = target[3]

    ac.load(target, tmp_path / "ckpt")

    # Same containers (except tuples, which are immutable)...
    assert target["model"] is model_dict
    assert target["model"]["layers"] is layers_list
    assert target["model"]["layers"][0] is layer0
    assert target["deep"] is deep_list
    assert target[3] is int_key_dict
    # ...and the same tensor objects, holding the loaded values.
    tensors_after = _tensor_objects(target)
    assert tensors_after.keys() == tensors_before.keys()
    saved_tensors = _tensor_objects(src)
    for fqn, t in tensors_before.items():
        assert tensors_after[fqn] is t, fqn
        assert_bits_equal(t, saved_tensors[fqn], fqn)
    # Tuples are rebuilt as tuples around the same (now loaded) tensor objects.
    assert type(target["pair"]) is tuple
    assert type(target["deep"][1]) is tuple
    assert target["deep"][1][0] is inner  # a dict inside a tuple keeps its identity
    assert target["step"] == 17


def test_load_returns_none_and_keeps_extra_target_structure_untouched(tmp_path: Path) -> None:
    ac.save({"a": torch.ones(3)}, tmp_path / "c")
    target = {"a": torch.zeros(3)}
    assert ac.load(target, tmp_path / "c") is None
    assert list(target) == ["a"]


def test_parameters_in_state_dict_load_in_place(tmp_path: Path) -> None:
    p = nn.Parameter(torch.randn(3, 4))
    ac.save({"p": p, "nonleaf": p * 2}, tmp_path / "c")
    q = nn.Parameter(torch.zeros(3, 4))
    r = torch.zeros(3, 4, requires_grad=True)
    target = {"p": q, "nonleaf": r}
    ac.load(target, tmp_path / "c")
    assert target["p"] is q and target["nonleaf"] is r
    assert isinstance(target["p"], nn.Parameter)
    assert q.requires_grad and q.is_leaf and q.grad_fn is None
    assert_bits_equal(q.detach(), p.detach())
    assert_bits_equal(r.detach(), (p * 2).detach())


def test_noncontiguous_parameter_target(tmp_path: Path) -> None:
    """A channels_last conv weight is a non-contiguous leaf that requires grad."""
    w = torch.randn(2, 3, 4, 4)
    ac.save({"w": w}, tmp_path / "c")
    conv = nn.Conv2d(3, 2, 4).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    target = {"w": conv.weight}
    ac.load(target, tmp_path / "c")
    assert target["w"] is conv.weight
    assert_bits_equal(conv.weight.detach(), w)


# ---------------------------------------------------------------- layouts and views


def test_noncontiguous_sources(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    src = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base[2:, 3:],
        "expanded": torch.randn(3, 1).expand(3, 5),
        "flipped_step": torch.arange(20, dtype=torch.int32)[1::4],
    }
    assert not any(t.is_contiguous() for k, t in src.items() if k != "flipped_step")
    expected = {k: v.contiguous().clone() for k, v in src.items()}
    ac.save(src, tmp_path / "c")
    target = {k: zeros_like_target(v) for k, v in src.items()}
    ac.load(target, tmp_path / "c")
    for k, v in expected.items():
        assert_bits_equal(target[k], v, k)


def test_noncontiguous_targets_filled_in_place(tmp_path: Path) -> None:
    src = {"t": torch.randn(4, 6), "s": torch.randn(5), "c": torch.randn(2, 3, 4)}
    ac.save(src, tmp_path / "c")
    big = torch.zeros(6, 4)
    strided_base = torch.zeros(10)
    c_base = torch.zeros(4, 3, 2)
    target = {"t": big.t(), "s": strided_base[::2], "c": c_base.permute(2, 1, 0)}
    objs = dict(target)
    ac.load(target, tmp_path / "c")
    for k in src:
        assert target[k] is objs[k]
        assert_bits_equal(target[k], src[k], k)
    # The writes went through the views into their bases.
    assert torch.equal(big, src["t"].t())
    assert torch.equal(strided_base[::2], src["s"])
    assert torch.equal(strided_base[1::2], torch.zeros(5))
    assert torch.equal(c_base, src["c"].permute(2, 1, 0))


def test_tensors_sharing_one_storage(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    src = {
        "base": base,
        "head": base[:8],
        "tail": base[16:],
        "overlap": base[4:12],
        "grid": base.view(4, 6),
        "cols": base.view(4, 6)[:, 1::2],
    }
    expected = {k: v.clone() for k, v in src.items()}
    md = ac.save(src, tmp_path / "c")
    assert md.tensors["head"].shape == (8,)
    assert md.tensors["grid"].shape == (4, 6)
    target = {k: torch.full(v.shape, -1.0) for k, v in src.items()}
    ac.load(target, tmp_path / "c")
    for k, v in expected.items():
        assert_bits_equal(target[k], v, k)


def test_load_into_views_of_one_base(tmp_path: Path) -> None:
    src = {"a": torch.randn(4), "b": torch.randn(4), "c": torch.randn(2, 2), "d": torch.randn(2)}
    ac.save(src, tmp_path / "c")
    base = torch.zeros(16)
    target = {"a": base[0:4], "b": base[4:8], "c": base[8:12].view(2, 2), "d": base[12:16:2]}
    ac.load(target, tmp_path / "c")
    for k, v in src.items():
        assert_bits_equal(target[k], v, k)
    assert torch.equal(base[:12], torch.cat([src["a"], src["b"], src["c"].reshape(-1)]))
    assert torch.equal(base[12:16:2], src["d"])
    assert torch.equal(base[13:16:2], torch.zeros(2))


@pytest.mark.parametrize(
    ("nbytes", "blocks"),
    [
        (10 * MiB, 3),  # spans three checksum blocks, the last one partial
        (BLOCK, 1),  # exactly one block
        (BLOCK + 12_345, 2),  # one full block and a small partial one
        (777, 1),  # well under one block
    ],
)
def test_large_and_partial_block_tensors(tmp_path: Path, nbytes: int, blocks: int) -> None:
    t = random_tensor(torch.uint8, (nbytes,), seed=nbytes)
    f = random_tensor(torch.float32, (nbytes // 4,), seed=nbytes + 1)
    md = ac.save({"bytes": t, "floats": f}, tmp_path / "c")
    assert md.tensors["bytes"].shape == (nbytes,)
    for chunk in (md.tensors["bytes"].chunks[0], ac.read_metadata(tmp_path / "c").tensors["bytes"].chunks[0]):
        if hasattr(chunk, "checksums"):  # one checksum per 4 MiB block (not public API)
            assert len(chunk.checksums) == blocks
    target = {"bytes": torch.zeros_like(t), "floats": torch.zeros_like(f)}
    ac.load(target, tmp_path / "c")
    assert_bits_equal(target["bytes"], t)
    assert_bits_equal(target["floats"], f)


def test_large_tensor_into_noncontiguous_target(tmp_path: Path) -> None:
    t = random_tensor(torch.float32, (1024, 2560), seed=7)  # 10 MiB
    ac.save({"t": t}, tmp_path / "c")
    holder = torch.zeros(2560, 1024)
    target = {"t": holder.t()}
    ac.load(target, tmp_path / "c")
    assert_bits_equal(target["t"], t)


def test_conjugate_and_negative_bit_views(tmp_path: Path) -> None:
    """``z.conj()`` and ``z.conj().imag`` are lazy views (conj / neg bit set); their values are saved."""
    z = torch.randn(4, dtype=torch.complex64)
    src = {"conj": z.conj(), "neg_imag": z.conj().imag}
    assert src["conj"].is_conj() and src["neg_imag"].is_neg()
    ac.save(src, tmp_path / "c")
    target = {"conj": torch.zeros(4, dtype=torch.complex64), "neg_imag": torch.zeros(4)}
    ac.load(target, tmp_path / "c")
    assert_bits_equal(target["conj"], z.conj().resolve_conj())
    assert_bits_equal(target["neg_imag"], z.conj().imag.resolve_neg())


@pytest.mark.asyncio
async def test_blocking_save_and_load_inside_a_running_event_loop(tmp_path: Path) -> None:
    t = torch.randn(33)
    ac.save({"t": t, "v": "x"}, tmp_path / "c")
    target: dict[str, Any] = {"t": torch.zeros(33), "v": None}
    ac.load(target, tmp_path / "c")
    assert_bits_equal(target["t"], t)
    assert target["v"] == "x"


# ---------------------------------------------------------------- non-tensor values


def _values() -> dict[str, Any]:
    return {
        "int": 7,
        "neg": -3,
        "big": 2**63 + 5,
        "huge": -(2**100) - 1,
        "float": 0.1,
        "negzero": -0.0,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "true": True,
        "false": False,
        "str": "héllo wörld ✓ 🚀 \x00 end",
        "emptystr": "",
        "none": None,
        "bytes": bytes(range(256)),
        "emptybytes": b"",
        "list": [1, "two", 3.0, None, [True, b"x"]],
        "tuple": (1, ("a", 2.5), []),
        "dict": {"a": {"b": {"c": 1}}, "n": [None]},
        "emptydict": {},
        "emptylist": [],
        "emptytuple": (),
        "int_keys": {0: "zero", 1: 1.5},
    }


def test_non_tensor_values_round_trip(tmp_path: Path) -> None:
    src = {"vals": _values(), "t": torch.randn(2)}
    ac.save(src, tmp_path / "c")
    target = {"vals": _zero_copy(_values()), "t": torch.zeros(2)}
    vals_dict = target["vals"]
    ac.load(target, tmp_path / "c")
    assert target["vals"] is vals_dict
    assert values_equal(target["vals"], _values()), target["vals"]
    # Types survive exactly: bool is not int, int is not float, bytes are bytes.
    v = target["vals"]
    assert v["true"] is True and v["false"] is False
    assert type(v["int"]) is int and type(v["float"]) is float and type(v["bytes"]) is bytes
    assert v["big"] == 2**63 + 5 and v["huge"] == -(2**100) - 1
    assert isinstance(v["tuple"], tuple) and isinstance(v["tuple"][1], tuple)


def test_values_replace_whatever_the_target_held(tmp_path: Path) -> None:
    ac.save({"a": 1, "b": "text", "c": None, "d": [1, 2]}, tmp_path / "c")
    target: dict[str, Any] = {"a": "old", "b": 99, "c": 3.5, "d": [None, None]}
    d_list = target["d"]
    ac.load(target, tmp_path / "c")
    assert target == {"a": 1, "b": "text", "c": None, "d": [1, 2]}
    assert target["d"] is d_list


# ---------------------------------------------------------------- modules and optimizers


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 4, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _assert_state_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert_bits_equal(b, a, where)
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_state_equal(x, y, f"{where}.{i}")
    else:
        assert values_equal(a, b), f"{where}: {a!r} != {b!r}"


def test_module_and_adam_restore_into_fresh_objects(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    for s in range(3):
        _train_step(model, opt, s)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    md = ac.save({"model": model, "optim": opt, "epoch": 3}, tmp_path / "c")
    assert "model.fc1.weight" in md.tensors
    assert "optim.state.0.exp_avg" in md.tensors

    torch.manual_seed(123)
    fresh = MLP()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    assert fresh_opt.state_dict()["state"] == {}
    fresh_params = list(fresh.parameters())
    target = {"model": fresh, "optim": fresh_opt, "epoch": 0}
    ac.load(target, tmp_path / "c")
    assert target["model"] is fresh and target["optim"] is fresh_opt
    assert target["epoch"] == 3
    assert all(a is b for a, b in zip(fresh.parameters(), fresh_params, strict=True))

    _assert_state_equal(saved_model, fresh.state_dict(), "model")
    _assert_state_equal(saved_opt, fresh_opt.state_dict(), "optim")
    # The restored optimizer state is keyed by the fresh model's parameters.
    for p in fresh.parameters():
        assert p in fresh_opt.state

    # Training continues identically from both.
    _train_step(model, opt, 99)
    _train_step(fresh, fresh_opt, 99)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert_bits_equal(b, a, name)
    _assert_state_equal(opt.state_dict(), fresh_opt.state_dict(), "optim after step")


def _sgd_setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 0.5},
        ],
        lr=0.1,
        momentum=0.9,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def test_sgd_groups_partial_state_and_scheduler(tmp_path: Path) -> None:
    model, opt, sched = _sgd_setup(0)
    for _ in range(3):
        opt.zero_grad()
        model[0](torch.randn(2, 3)).sum().backward()  # only the first layer has gradients
        opt.step()
        sched.step()
    ac.save({"m": model, "o": opt, "s": sched}, tmp_path / "c")
    model2, opt2, sched2 = _sgd_setup(1)
    ac.load({"m": model2, "o": opt2, "s": sched2}, tmp_path / "c")
    _assert_state_equal(model.state_dict(), model2.state_dict(), "m")
    _assert_state_equal(opt.state_dict(), opt2.state_dict(), "o")
    assert sched2.state_dict() == sched.state_dict()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_optimizer_with_existing_state_is_overwritten(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    _train_step(model, opt, 0)
    ac.save({"m": model, "o": opt}, tmp_path / "c")
    torch.manual_seed(1)
    model2 = MLP()
    opt2 = torch.optim.Adam(model2.parameters())
    for s in range(4):
        _train_step(model2, opt2, 10 + s)
    ac.load({"m": model2, "o": opt2}, tmp_path / "c")
    _assert_state_equal(model.state_dict(), model2.state_dict(), "m")
    _assert_state_equal(opt.state_dict(), opt2.state_dict(), "o")


def test_statefuls_inside_containers_and_plain_dict_interop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = [MLP(), MLP()]
    ac.save({"ms": models}, tmp_path / "c")
    torch.manual_seed(1)
    fresh = [MLP(), MLP()]
    ac.load({"ms": fresh}, tmp_path / "c")
    for a, b in zip(models, fresh, strict=True):
        _assert_state_equal(a.state_dict(), b.state_dict())
    # A module's checkpoint loads into the plain state dict of another instance, too.
    other = MLP()
    sd = other.state_dict()
    ac.load({"ms": [sd, MLP().state_dict()]}, tmp_path / "c")
    _assert_state_equal(models[0].state_dict(), other.state_dict())


# ---------------------------------------------------------------- meta device


def test_meta_state_dict_is_materialised_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = MLP()
    _train_step(real, torch.optim.SGD(real.parameters(), lr=0.1), 0)
    saved = copy.deepcopy(real.state_dict())
    ac.save({"m": real.state_dict()}, tmp_path / "c")

    with torch.device("meta"):
        model = MLP()
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())
    outer = {"m": sd}
    ac.load(outer, tmp_path / "c")
    assert outer["m"] is sd
    assert list(sd) == list(saved)
    for k, v in saved.items():
        assert not sd[k].is_meta, k
        assert_bits_equal(sd[k], v, k)

    model.load_state_dict(sd, assign=True)
    for k, v in model.state_dict().items():
        assert not v.is_meta, k
        assert_bits_equal(v, saved[k], k)
    # The materialised model is usable.
    model.eval()
    real.eval()
    x = torch.randn(3, 8)
    assert torch.equal(model(x), real(x))


def test_meta_module_in_state_dict_is_materialised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = MLP()
    saved = copy.deepcopy(real.state_dict())
    ac.save({"model": real}, tmp_path / "c")
    with torch.device("meta"):
        model = MLP()
    target = {"model": model}
    ac.load(target, tmp_path / "c")
    assert target["model"] is model
    for k, v in model.state_dict().items():
        assert not v.is_meta, k
        assert_bits_equal(v, saved[k], k)
    assert isinstance(model.fc1.weight, nn.Parameter)


def test_meta_tensors_inside_lists_and_tuples(tmp_path: Path) -> None:
    src = {"l": [torch.randn(3), torch.randn(2, 2)], "t": (torch.arange(4), torch.randn(1))}
    ac.save(src, tmp_path / "c")
    with torch.device("meta"):
        target = {
            "l": [torch.empty(3), torch.empty(2, 2)],
            "t": (torch.empty(4, dtype=torch.int64), torch.empty(1)),
        }
    lst = target["l"]
    ac.load(target, tmp_path / "c")
    assert target["l"] is lst
    assert isinstance(target["t"], tuple)
    for got, exp in zip([*target["l"], *target["t"]], [*src["l"], *src["t"]], strict=True):
        assert not got.is_meta
        assert_bits_equal(got, exp)


# ---------------------------------------------------------------- property-based


_keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
_plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)


@st.composite
def _tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    return random_tensor(dtype, shape, seed=draw(st.integers(0, 2**16)))


_leaves = st.one_of(_plain, _tensors())
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(_keys, kids, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _trees, min_size=1, max_size=4))
def test_random_state_dicts_round_trip(src: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        ac.save(src, Path(d) / "c")
        target = _zero_copy(src)
        ac.load(target, Path(d) / "c")
    assert values_equal(target, src)
