"""Checkpoints you can trust (single process, torch engine, in-process runs of tiny models): every corruption
of a checkpoint is caught by its manifest and the run falls back to the previous complete checkpoint with a
one-line warning naming the file; unreadable state files give one-line errors naming the file; a missing or
bogus ``latest`` is found by scanning; a resume with changed data/loss settings is refused; a non-finite loss
stops the run (no ``final/``, the last good checkpoint kept)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import base_config, make_tiny_setup  # noqa: E402

from distill_engine.trainer import checkpoint as ckpt  # noqa: E402
from distill_engine.trainer import guards  # noqa: E402
from distill_engine.trainer.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_trust"))
    return root, make_tiny_setup(root, n_lines=48)


def _cfg(paths, out, **train_kw):
    tr = {"engine": "torch", "zero_stage": 0, "max_steps": 4, "save_every": 2, "warmup_steps": 1}
    tr.update(train_kw)
    return base_config(paths, out, teacher="none", train=tr)


def _losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def straight(tiny):
    """4 steps uninterrupted, checkpoints at 2 and 4: the reference and the template of each corruption."""
    root, paths = tiny
    out = os.path.join(root, "straight")
    s = train(_cfg(paths, out))
    assert s["steps"] == 4
    return out


def _copy(straight, root, name):
    dst = os.path.join(root, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(straight, dst)
    return dst


def _flip(path, n=64):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)


def _resume(paths, out, **run_kw):
    cfg = _cfg(paths, out, max_steps=4)
    cfg["run"].update(resume=True, **run_kw)
    return train(cfg)


def test_manifest_lists_every_file_with_size_and_sha256(straight):
    tag_dir = os.path.join(ckpt.checkpoint_root(straight), "step00000004")
    man = json.load(open(os.path.join(tag_dir, "manifest", "rank0.json")))
    assert man["world"] == 1 and man["step"] == 4
    assert set(man["files"]) == {"engine_state.pt", "rng/rank0.pt", "trainer_state.json"}
    from distill_engine.data.io import sha256_file

    for rel, ent in man["files"].items():
        p = os.path.join(tag_dir, rel)
        assert ent["size"] == os.path.getsize(p) and ent["sha256"] == sha256_file(p)
    assert ckpt.is_complete(tag_dir) and ckpt.latest_tag(straight) == "step00000004"


@pytest.mark.parametrize("damage, mode, bad", [
    ("flip", "full", "engine_state.pt"), ("truncate", "size", "engine_state.pt"),
    ("flip", "full", "rng/rank0.pt"), ("halfjson", "full", "trainer_state.json"),
    ("nomanifest", "full", "manifest/rank0.json"), ("halfjson", "none", "trainer_state.json"),
])
def test_corrupted_checkpoint_falls_back_with_one_line_warning(tiny, straight, capfd, damage, mode, bad):
    root, paths = tiny
    out = _copy(straight, root, f"fb_{damage}_{mode}_{bad.replace('/', '_')}")
    target = os.path.join(ckpt.checkpoint_root(out), "step00000004", bad)
    if damage == "flip":
        _flip(target)
    elif damage == "truncate":
        _truncate(target)
    elif damage == "halfjson":
        text = open(target).read()
        open(target, "w").write(text[: len(text) // 2])
    else:
        os.unlink(target)
    capfd.readouterr()
    s = _resume(paths, out, verify_checkpoint=mode)
    err = capfd.readouterr().err
    warn = [l for l in err.splitlines() if "not usable" in l]
    assert len(warn) == 1 and bad.split("/")[-1] in warn[0] and "step00000004" in warn[0], err[-2000:]
    assert s["start_step"] == 2 and s["steps"] == 4  # the intact step-2 checkpoint, then 2 more steps
    assert _losses(out) == _losses(straight)  # bit-identical to the uninterrupted run
    # the re-saved step 4 is complete and verified; the intact step 2 was not pruned in favour of a bad one
    assert ckpt.verify_own(os.path.join(ckpt.checkpoint_root(out), "step00000004"), 0, "full")[0]
    assert os.path.isdir(os.path.join(ckpt.checkpoint_root(out), "step00000002"))


@pytest.mark.parametrize("bad", ["engine_state.pt", "rng/rank0.pt"])
def test_unreadable_state_file_without_verification_is_a_one_line_error(tiny, straight, bad):
    root, paths = tiny
    out = _copy(straight, root, f"noverify_{bad.replace('/', '_')}")
    target = os.path.join(ckpt.checkpoint_root(out), "step00000004", bad)
    open(target, "wb").write(open(target, "rb").read()[:37])  # truncated / garbage
    with pytest.raises(ValueError) as e:
        _resume(paths, out, verify_checkpoint="none")
    msg = str(e.value)
    assert target in msg and "\n" not in msg and ("unreadable" in msg or "truncated" in msg), msg


@pytest.mark.parametrize("latest", [None, "step00000099", "garbage\x00\x01"])
def test_missing_or_bogus_latest_scans_step_directories(tiny, straight, latest):
    root, paths = tiny
    out = _copy(straight, root, f"latest_{latest is None}_{len(latest or '')}")
    hint = os.path.join(ckpt.checkpoint_root(out), "latest")
    if latest is None:
        os.unlink(hint)
    else:
        open(hint, "w").write(latest)
    cfg = _cfg(paths, out, max_steps=6)
    cfg["run"]["resume"] = True
    s = train(cfg)
    assert s["start_step"] == 4 and s["steps"] == 6


def test_changed_settings_are_refused_listing_the_keys(tiny, straight):
    root, paths = tiny
    out = _copy(straight, root, "changed")
    cfg = _cfg(paths, out, max_steps=6, micro_batch_size=3)
    cfg["data"]["seq_len"] = 24
    cfg["run"]["resume"] = True
    with pytest.raises(ValueError) as e:
        train(cfg)
    msg = str(e.value)
    assert "data.seq_len" in msg and "train.micro_batch_size" in msg and "--allow-config-change" in msg, msg
    assert "run.seed" not in msg
    cfg["run"]["allow_config_change"] = True
    assert train(cfg)["start_step"] == 4


def test_non_finite_loss_stops_with_code_3_keeping_the_last_checkpoint(tiny, straight):
    """A student whose weights turn NaN after step 2 (one poisoned value): the run stops at step 3 naming it,
    writes no final/, and the step-2 checkpoint stays the newest complete one."""
    root, paths = tiny
    out = _copy(straight, root, "nonfinite")
    shutil.rmtree(os.path.join(ckpt.checkpoint_root(out), "step00000004"))
    shutil.rmtree(os.path.join(out, "final"))
    state_path = os.path.join(ckpt.checkpoint_root(out), "step00000002", "engine_state.pt")
    st = torch.load(state_path, weights_only=False)
    k = next(k for k in st["module"] if k.endswith("layers.0.mlp.down_proj.weight"))
    st["module"][k][0, 0] = float("nan")
    torch.save(st, state_path)
    cfg = _cfg(paths, out, max_steps=4)
    cfg["run"].update(resume=True, verify_checkpoint="none")
    cfg["loss"]["validate"] = "never"  # let the NaN through the op's input check: the trainer must stop it
    with pytest.raises(guards.NonFiniteError) as e:
        train(cfg)
    msg = str(e.value)
    assert e.value.exit_code == 3 and "optimizer step 3" in msg and "step00000002" in msg and "\n" not in msg, msg
    assert not os.path.exists(os.path.join(out, "final"))
    assert ckpt.latest_tag(out) == "step00000002"
