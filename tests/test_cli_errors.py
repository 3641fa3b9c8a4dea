"""One-line errors: every user error the CLI can meet prints ``distill-engine <cmd>: error: ...`` naming the
file, key or argument, and exits 2 — no traceback (``--debug`` shows one). Checked before any model is built
where the issue asks for it. Most cases call ``cli.main`` in-process (a world of one); one runs the real
command line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import base_config, make_tiny_setup, write_jsonl  # noqa: E402

from distill_engine import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli_errors"))
    paths = make_tiny_setup(root, n_lines=24)
    cfg = base_config(paths, os.path.join(root, "out"), teacher="none",
                      train={"engine": "torch", "zero_stage": 0, "max_steps": 1})
    config = os.path.join(root, "run.yaml")
    yaml.safe_dump(cfg, open(config, "w"))
    return root, paths, config


def _run(capfd, argv):
    capfd.readouterr()
    code = cli.main(argv)
    out = capfd.readouterr()
    return code, out.err


def _one_line(err, cmd="train"):
    lines = [l for l in err.splitlines() if l.startswith(f"distill-engine {cmd}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_malformed_set_value(tiny, capfd):
    _, _, config = tiny
    code, err = _run(capfd, ["train", "--config", config, "--set", "train.lr=[1e-3,"])
    assert code == 2 and "train.lr" in _one_line(err) and "not valid YAML" in err


@pytest.mark.parametrize("content, name, expect", [
    ("", "empty.jsonl", "is empty"),
    ("hello world\nnot json\n", "notjson.jsonl", "not JSON"),
    ('{"text": "ok"}\n{"text": broken\n', "badline.jsonl", "line 2 is not valid JSON"),
])
def test_bad_data_files(tiny, capfd, content, name, expect):
    root, _, config = tiny
    path = os.path.join(root, name)
    open(path, "w").write(content)
    code, err = _run(capfd, ["train", "--config", config, "--set", f"data.train_files=[{path}]"])
    line = _one_line(err)
    assert code == 2 and path in line and expect in line, line


def test_model_dir_without_weights_or_truncated(tiny, capfd):
    root, paths, config = tiny
    only_cfg = os.path.join(root, "only_config")
    os.makedirs(only_cfg, exist_ok=True)
    shutil.copy(os.path.join(paths["student"], "config.json"), only_cfg)
    code, err = _run(capfd, ["train", "--config", config, "--set", f"student.path={only_cfg}"])
    line = _one_line(err)
    assert code == 2 and "student.path" in line and "no weights" in line and "Loading weights" not in err, line
    trunc = os.path.join(root, "truncated")
    shutil.copytree(paths["student"], trunc, dirs_exist_ok=True)
    st = os.path.join(trunc, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) - 100])
    code, err = _run(capfd, ["train", "--config", config, "--set", f"student.path={trunc}"])
    line = _one_line(err)
    assert code == 2 and st in line and "truncated" in line, line


def test_output_dir_is_a_file_checked_before_models(tiny, capfd):
    root, _, config = tiny
    f = os.path.join(root, "a_file")
    open(f, "w").write("x")
    code, err = _run(capfd, ["train", "--config", config, "--output-dir", f])
    line = _one_line(err)
    assert code == 2 and "run.output_dir" in line and "is a file" in line and "Loading weights" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_not_writable(tiny, capfd, tmp_path):
    _, _, config = tiny
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = _run(capfd, ["train", "--config", config, "--output-dir", str(ro / "out")])
    assert code == 2 and "not writable" in _one_line(err)


@pytest.mark.parametrize("init, expect", [
    ({"hiden_size": 64}, "did you mean 'hidden_size'"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden size (30) is not a multiple"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": 0}, "student.init.vocab_size"),
])
def test_student_init_typos_and_rejected_values(tiny, capfd, init, expect):
    root, _, config = tiny
    base = {"vocab_size": 257, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    base.update(init)
    cfg = yaml.safe_load(open(config))
    cfg["student"] = {"init": base}
    cfg["data"]["tokenizer"] = "byte"
    path = os.path.join(root, f"init_{len(init)}_{list(init)[0]}.yaml")
    yaml.safe_dump(cfg, open(path, "w"))
    code, err = _run(capfd, ["train", "--config", path])
    line = _one_line(err)
    assert code == 2 and "student.init" in line and expect in line, line


def test_exit_codes_and_debug_traceback(monkeypatch, capfd):
    from distill_engine.trainer import guards

    def boom(args):
        raise guards.NonFiniteError("non-finite values at optimizer step 7: the loss is nan")

    monkeypatch.setitem(cli.COMMANDS, "boom", ("test", lambda p: None, boom))
    code, err = _run(capfd, ["boom"])
    assert code == 3 and _one_line(err, "boom").endswith("optimizer step 7: the loss is nan")
    code, err = _run(capfd, ["--debug", "boom"])
    assert code == 3 and "Traceback" in err and "NonFiniteError" in err


def test_eval_user_errors_before_models(tiny, capfd):
    root, paths, _ = tiny
    held = os.path.join(root, "held.jsonl")
    with open(held, "w") as f:
        f.write(json.dumps({"text": "the alpha sees", "slice": "a"}) + "\n")
        f.write(json.dumps({"text": "the beta sees"}) + "\n")
    good = write_jsonl(os.path.join(root, "held_ok.jsonl"), 4)
    a_file = os.path.join(root, "report_file")
    open(a_file, "w").write("x")
    base = ["eval", "--teacher", paths["teacher"], "--student", paths["student"], "--no-progress"]
    code, err = _run(capfd, base + ["--data", good, "--out", a_file])
    line = _one_line(err, "eval")
    assert code == 2 and a_file in line and "is a file" in line and "Loading weights" not in err, line
    missing = os.path.join(root, "nope", "metrics.jsonl")
    code, err = _run(capfd, base + ["--data", good, "--metrics", missing])
    line = _one_line(err, "eval")
    assert code == 2 and missing in line, line
    code, err = _run(capfd, base + ["--data", held])
    line = _one_line(err, "eval")
    assert code == 2 and "record 1" in line and "'slice'" in line, line


def test_real_command_line_prints_one_line(tiny, tmp_path):
    """The shell command a user types: a malformed value and a missing data file, no traceback."""
    _, _, config = tiny
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-m", "distill_engine.cli", "train", "--config", config, "--set",
                          "data.train_files=[/nonexistent/x.jsonl]"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("distill-engine train: error: data.train_files")


def test_signal_handler_first_requests_second_exits_at_once(tmp_path):
    """First SIGTERM: a request (the loop checkpoints at the step's end); a duplicate within milliseconds (a
    launcher forwarding the same signal) is ignored; a second one later exits 143 at once."""
    script = (
        "import os, signal, time\n"
        "from distill_engine.trainer.guards import PreemptionHandler, SECOND_SIGNAL_AFTER_S\n"
        "with PreemptionHandler() as h:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert h.requested == signal.SIGTERM\n"
        "    print('requested', flush=True)\n"
        "    time.sleep(SECOND_SIGNAL_AFTER_S + 0.3)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not reached', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 143 and "requested" in res.stdout and "not reached" not in res.stdout, res.stderr
    assert res.stderr.count("SIGTERM received") == 1 and "second SIGINT: stopping now" in res.stderr, res.stderr


def test_resume_with_changed_settings_from_the_command_line(tiny, capfd):
    """`--resume` with a changed seq_len is refused in one line listing the key; `--allow-config-change`
    continues."""
    root, _, config = tiny
    out = os.path.join(root, "changed_cli")
    base = ["train", "--config", config, "--output-dir", out, "--set", "train.save_every=1"]
    code, err = _run(capfd, base)
    assert code == 0, err[-2000:]
    more = ["--set", "train.max_steps=2", "--resume", "--set", "data.seq_len=24"]
    code, err = _run(capfd, base + more)
    line = _one_line(err)
    assert code == 2 and "data.seq_len (32 -> 24)" in line and "--allow-config-change" in line, line
    code, err = _run(capfd, base + more + ["--allow-config-change"])
    assert code == 0, err[-2000:]
