"""The shared op core (issue 11): one backend registry and one chunk policy in ``_backend``, option dataclasses
validated on construction, ``ops/library.py`` on public launcher functions only, ``functional`` as plain functions."""
import ast
import dataclasses
import inspect
import pathlib
import types

import pytest
import torch

from distill_engine import _backend, functional
from distill_engine.ops import distill_loss, logprobs_at, projection_loss, teacher_targets, token_relation

ROOT = pathlib.Path(__file__).resolve().parents[1] / "distill_engine"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CHUNK_VARS = ["DISTILL_ENGINE_CHUNK_BYTES"] + [_backend.chunk_env_var(op) for op in _backend.CHUNK_POLICIES]


@pytest.fixture(autouse=True)
def clean_chunk_env(monkeypatch):
    for name in CHUNK_VARS + list(_backend._LEGACY_ENV):
        monkeypatch.delenv(name, raising=False)


def _old_loss_rows(V, elems):  # the pre-registry ops/distill_loss.py formula, in fp32 elements
    rows = max(1, elems // V)
    return max(16, min(1 << (rows.bit_length() - 1), 8192))


def _old_tt_rows(V, elems):
    rows = max(1, elems // V)
    return max(8, min(1 << (rows.bit_length() - 1), 8192))


def _old_proj_rows(n, d_t, budget):
    rows = max(16, budget // (4 * max(d_t, 1)))
    return max(1, min(1 << (rows.bit_length() - 1), max(n, 1)))


@pytest.mark.parametrize("V", [1, 7, 101, 32000, 128256, 262144])
def test_default_budgets_are_the_old_ones(V, monkeypatch):
    big = types.SimpleNamespace(total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: big)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _backend.chunk_rows("distill_loss", None, 4 * V, CPU) == _old_loss_rows(V, 2**23)
    assert _backend.chunk_rows("distill_loss", None, 4 * V, CUDA) == _old_loss_rows(V, 2**29)
    assert _backend.chunk_rows("logprobs_at", None, 4 * V, CPU) == _old_loss_rows(V, 2**23)
    assert _backend.chunk_rows("teacher_targets", None, 4 * V, CPU) == _old_tt_rows(V, 2**23)
    assert _backend.chunk_rows("teacher_targets", None, 4 * V, CUDA) == _old_tt_rows(V, 2**27)
    assert _backend.chunk_rows("teacher_rest", 37, 4 * V, CUDA) == max(1, min(37, 2**27 // V))
    for n, d_t in ((13, V), (5000, V), (0, V)):
        assert _backend.chunk_rows("projection_loss", n, 4 * d_t, CPU) == _old_proj_rows(n, d_t, 2**23)
        assert _backend.chunk_rows("projection_loss", n, 4 * d_t, CUDA) == _old_proj_rows(n, d_t, 2**26)


def test_small_card_caps_the_loss_budget(monkeypatch):
    small = types.SimpleNamespace(total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: small)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    V = 128256
    assert _backend.chunk_budget("distill_loss", CUDA) == max(2**26, small.total_memory // 96 * 4)
    assert _backend.chunk_rows("distill_loss", None, 4 * V, CUDA) == _old_loss_rows(V, small.total_memory // 96)
    assert _backend.chunk_budget("teacher_targets", CUDA) == 2**29  # no cap: its default is already small


@pytest.mark.parametrize("op", sorted(_backend.CHUNK_POLICIES))
def test_env_precedence_per_op_then_global_then_default(op, monkeypatch):
    default = _backend.chunk_budget(op, CPU)
    monkeypatch.setenv("DISTILL_ENGINE_CHUNK_BYTES", "12345")
    assert _backend.chunk_budget(op, CPU) == 12345
    monkeypatch.setenv(_backend.chunk_env_var(op), "777")
    assert _backend.chunk_budget(op, CPU) == 777
    other = next(o for o in _backend.CHUNK_POLICIES if o != op)
    assert _backend.chunk_budget(other, CPU) == 12345  # a per-op variable touches only its op
    monkeypatch.delenv("DISTILL_ENGINE_CHUNK_BYTES")
    monkeypatch.delenv(_backend.chunk_env_var(op))
    assert _backend.chunk_budget(op, CPU) == default


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_bad_env_values_name_the_variable(value, monkeypatch):
    monkeypatch.setenv("DISTILL_ENGINE_PROJECTION_LOSS_CHUNK_BYTES", value)
    with pytest.raises(ValueError, match="DISTILL_ENGINE_PROJECTION_LOSS_CHUNK_BYTES must be a positive integer"):
        _backend.chunk_rows("projection_loss", 10, 4 * 64, CPU)
    h, P, t = torch.randn(10, 8), torch.randn(64, 8), torch.randn(10, 64)
    with pytest.raises(ValueError, match="DISTILL_ENGINE_PROJECTION_LOSS_CHUNK_BYTES"):
        projection_loss.fused_projection_loss(h, P, t, backend="torch")


@pytest.mark.parametrize("old", sorted(_backend._LEGACY_ENV))
def test_old_variables_are_refused_naming_the_new_one(old, monkeypatch):
    monkeypatch.setenv(old, "1024")
    with pytest.raises(ValueError, match=f"{old} is no longer read; set DISTILL_ENGINE_"):
        _backend.chunk_budget("distill_loss", CPU)


def test_env_budget_changes_the_chunking_not_the_result(monkeypatch):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(37, 8, generator=g), torch.randn(53, 8, generator=g)
    ids = torch.randint(0, 53, (37, 3), generator=g)
    ref = logprobs_at.logprobs_at(h, w, ids, backend="torch")
    monkeypatch.setenv("DISTILL_ENGINE_CHUNK_BYTES", str(4 * 53 * 16))  # 16 rows a chunk: 3 chunks
    assert _backend.chunk_rows("logprobs_at", None, 4 * 53, CPU) == 16
    torch.testing.assert_close(logprobs_at.logprobs_at(h, w, ids, backend="torch"), ref)  # GEMM blocking: ~1 ulp


def test_registry_holds_one_impl_per_op_and_backend():
    expect_cpu = {"fused_distill_loss": distill_loss.DistillLossCpuImpl,
                  "teacher_targets": teacher_targets.TeacherTargetsCpuImpl,
                  "fused_projection_loss": projection_loss.ProjectionLossCpuImpl,
                  "token_relation_loss": token_relation.TokenRelationCpuImpl}
    for op, cls in expect_cpu.items():
        assert _backend.impl_for(op, "cpu") is cls
        assert _backend.cpu_symbol_for(op) is not None
        assert _backend.impl_for(op, "torch") is not None
    assert _backend.impl_for("teacher_targets", "torch") is teacher_targets.TeacherTargetsTorchImpl
    if _backend.triton_available():
        assert _backend.impl_for("teacher_targets", "triton").__name__ == "TeacherTargetsTritonImpl"
        assert _backend.impl_for("fused_distill_loss", "triton").__name__ == "distill_engine.kernels.distill_loss"
    with pytest.raises(ValueError, match="no implementation registered for backend 'gpu'"):
        _backend.impl_for("fused_distill_loss", "gpu")
    with pytest.raises(ValueError, match="register_impl: backend must be one of"):
        _backend.register_impl("x", "auto", object())
    with pytest.raises(ValueError, match="cpu_symbol is only meaningful"):
        _backend.register_impl("x", "torch", object(), cpu_symbol="y")


def test_registry_imports_string_impls_lazily():
    try:
        _backend.register_impl("_test_op", "torch", "distill_engine.reference.distill_loss:buf_lse")
        from distill_engine.reference.distill_loss import buf_lse

        assert _backend.impl_for("_test_op", "torch") is buf_lse
        assert _backend.resolve_backend("auto", CPU, "_test_op") == "torch"  # no cpu symbol registered
    finally:
        _backend._IMPLS.pop(("_test_op", "torch"), None)


@pytest.mark.parametrize("cls, good, bad", [
    (distill_loss.DistillOptions, {}, [dict(backend="cuda"), dict(temperature=0.0), dict(chunk_rows=0)]),
    (teacher_targets.TeacherTargetsOptions, {}, [dict(backend="cuda"), dict(k=2.0), dict(temperature=-1.0),
                                                dict(method="x"), dict(chunk_rows=True)]),
    (projection_loss.ProjectionLossOptions, {}, [dict(backend="cuda"), dict(kind="x"), dict(chunk_rows=-1)]),
    (logprobs_at.LogprobsAtOptions, {}, [dict(backend="cuda"), dict(temperature=float("nan")),
                                         dict(chunk_rows=0)]),
    (token_relation.TokenRelationOptions, dict(heads=2), [dict(heads=0), dict(heads=2, backend="cuda"),
                                                          dict(heads=2, causal=1)]),
])
def test_option_dataclasses_are_frozen_and_checked_on_construction(cls, good, bad):
    opts = cls(**good)
    assert dataclasses.is_dataclass(opts) and opts.backend == "auto"  # one meaning of backend: the user's choice
    field = dataclasses.fields(opts)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, field, getattr(opts, field))
    for kw in bad:
        with pytest.raises(ValueError):
            cls(**kw)


def _private_cross_module_uses(path: pathlib.Path):
    """Attribute reads `mod._name` on imported modules, and `from x import _name` of other modules."""
    tree = ast.parse(path.read_text())
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    found = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")
             and not n.attr.startswith("__")]
    found += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
              if a.name.startswith("_") and n.module not in (None, "__future__")]
    return found


@pytest.mark.parametrize("rel", ["ops/library.py", "ops/logprobs_at.py", "ops/teacher_targets.py",
                                 "ops/distill_loss.py", "ops/projection_loss.py", "ops/token_relation.py",
                                 "ops/logit_transform.py", "functional.py", "modules.py"])
def test_no_private_cross_module_calls(rel):
    assert _private_cross_module_uses(ROOT / rel) == []


def test_functional_is_plain_functions():
    tree = ast.parse((ROOT / "functional.py").read_text())
    assert not any(isinstance(n, ast.Try) for n in ast.walk(tree))  # no import shims
    for name in functional.__all__:
        fn = getattr(functional, name)
        assert inspect.isfunction(fn) and fn.__module__.startswith("distill_engine.ops."), name
