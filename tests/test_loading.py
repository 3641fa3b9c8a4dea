"""The one model/tokenizer loading module (distill_engine/loading.py) and the loaders built on it."""
import os

import pytest

from distill_engine import loading
from distill_engine.data.tokenizer import byte_level_tokenizer
from distill_engine.data.tokenizer import load_tokenizer as data_load_tokenizer
from distill_engine.eval.models import load_tokenizer as eval_load_tokenizer


def test_tokenizer_round_trip_always_has_a_pad_token(tmp_path):
    tok = byte_level_tokenizer()
    tok.pad_token = None  # saved without one: the loader falls back to eos
    tok.save_pretrained(str(tmp_path))
    assert loading.has_tokenizer_files(tmp_path)
    for got in (loading.load_tokenizer_dir(tmp_path, key="k", fix="f"), data_load_tokenizer(str(tmp_path)),
                eval_load_tokenizer(str(tmp_path))):
        assert got.pad_token == got.eos_token == "<|endoftext|>"
        assert got("def f(): pass")["input_ids"] == tok("def f(): pass")["input_ids"]


@pytest.mark.parametrize("load, message", [
    (lambda d: data_load_tokenizer(d, key="data.tokenizer"),
     "data.tokenizer: no tokenizer files .* point data.tokenizer at a directory saved by save_pretrained, or use 'byte'"),
    (lambda d: eval_load_tokenizer(d, "teacher tokenizer"),
     "teacher tokenizer: no tokenizer files .*; pass --tokenizer DIR"),
    (lambda d: loading.load_config(d, key="student.path"),
     "student.path: .* is not a Hugging Face model directory \\(no config.json\\)"),
    (lambda d: loading.load_causal_lm(d, key="teacher.path", dtype=None),
     "teacher.path: checkpoint path .* holds no model: config.json missing"),
])
def test_an_empty_directory_is_one_line_naming_the_key(tmp_path, load, message):
    with pytest.raises(ValueError, match=message) as e:
        load(str(tmp_path))
    assert "\n" not in str(e.value)


def test_model_dir_check_recognizes_checkpoints_and_nested_models(tmp_path):
    (tmp_path / "global_step10").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="DeepSpeed checkpoint.*model directories inside it: .*final'"):
        loading.check_model_dir(str(tmp_path), "student")
    with pytest.raises(ValueError, match="student: .* does not exist"):
        loading.check_model_dir(str(tmp_path / "nope"), "student")
    with pytest.raises(ValueError, match="student must be a path"):
        loading.check_model_dir(3, "student")
    (tmp_path / "final" / "model.safetensors").write_bytes(b"")
    assert loading.check_model_dir(tmp_path / "final", "student") == os.fspath(tmp_path / "final")
