"""`zaya train` and what it finds: an --out holding other outputs or written by another run, a changed
data file on --resume, text data with the default model, a --seq-len beyond the context."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from zaya_jax.cli import main
from zaya_jax.outputs import OutputLock
from zaya_jax.train import loop


def _train_args(out, data, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "1", "--seq-len", "16",
            "--no-progress", *extra]


@pytest.fixture
def text_data(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "1+2=3"}) + "\n")
    return data


def test_train_refuses_an_out_holding_foreign_outputs(tmp_path, text_data, capsys):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("the user's")
    (out / "metrics.jsonl").write_text("not a run's log\n")
    (out / "notes.txt").write_text("unrelated")
    assert main(_train_args(out, text_data)) == 2
    err = capsys.readouterr().err
    assert "already holds model, metrics.jsonl; pass --resume" in err and "--force" in err
    assert (out / "model" / "mine.txt").read_text() == "the user's"
    assert (out / "metrics.jsonl").read_text() == "not a run's log\n"

    settings = {"data": {"data": str(text_data)}}
    loop.prepare_out(str(out), settings, resume=False, force=True)  # --force: a fresh run's outputs only
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text()) == settings


@pytest.mark.parametrize("command", ["train", "rl"])
def test_out_never_holds_the_runs_data_or_model(tmp_path, capsys, command):
    """--force deletes --out's metrics.jsonl and model/: refused when they are the run's --data or --model."""
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    data = out / "metrics.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    argv = [command, "--data", str(data), "--out", str(out), "--steps", "1", "--force", "--no-progress"]
    assert main(argv) == 2
    assert f"--out's metrics.jsonl {out / 'metrics.jsonl'} is the same file as --data" in capsys.readouterr().err
    other = tmp_path / "data.jsonl"
    other.write_text(data.read_text())
    argv = [command, "--data", str(other), "--model", str(out / "model"), "--out", str(out), "--steps", "1", "--force"]
    assert main(argv) == 2
    assert f"is the same directory as --model {out / 'model'}" in capsys.readouterr().err
    assert data.exists() and (out / "model" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("command", ["train", "rl"])
def test_one_run_writes_an_out_at_a_time(tmp_path, capsys, command):
    """Another run's lock on --out refuses the command before anything is written, and a run holds the lock
    (``loop.open_out``) until it ends, ``--resume`` included."""
    out, data = tmp_path / "out", tmp_path / "data.jsonl"
    out.mkdir()
    data.write_text(json.dumps({"question": "1+1", "answer": "2", "text": "1+1=2"}) + "\n")
    with OutputLock(str(out), "--out"):  # another process's run, as far as flock goes
        assert main([command, "--data", str(data), "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    assert f"--out {out} is being written by another run (it holds the lock): one writer per output" in \
        capsys.readouterr().err
    assert os.listdir(out) == []
    settings = {"data": {"data": str(data)}}
    with loop.open_out(str(out), settings, resume=False):
        assert os.listdir(out) == ["run.json"]
        with pytest.raises(ValueError, match="being written by another run"):
            loop.open_out(str(out), settings, resume=True)
    loop.open_out(str(out), settings, resume=True).close()  # the run is over: the directory is free


def test_ctrl_c_ends_a_run_with_130_and_no_traceback(tmp_path, text_data):
    """SIGINT while the step compiles (once a crash in the interpreter's teardown): status 130, one line."""
    argv = [sys.executable, "-m", "zaya_jax.cli", *_train_args(tmp_path / "out", text_data, "--steps", "50")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # "data: ..." is printed just before the step compiles
        if line.startswith("data:"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-3000:]
    assert "Traceback" not in err


def test_resume_refuses_a_changed_data_file(tmp_path, text_data):
    from zaya_jax.train.data import file_sha256

    out = str(tmp_path / "out")
    settings = lambda: {"data": {"data": str(text_data), "sha256": file_sha256(text_data)}}  # noqa: E731
    loop.prepare_out(out, settings(), resume=False)
    loop.prepare_out(out, settings(), resume=True)  # unchanged: fine
    text_data.write_text(json.dumps({"text": "1+2=4"}) + "\n")
    with pytest.raises(ValueError, match=rf"the data file {text_data} changed since the run started"):
        loop.prepare_out(out, settings(), resume=True)


@dataclasses.dataclass(frozen=True)
class Knobs:
    steps: int
    mix: bool = False  # a setting added after some runs started


def test_resume_matches_a_setting_the_saved_run_predates_at_its_default(tmp_path):
    out, defaults = str(tmp_path / "out"), loop.setting_defaults(rl=Knobs)
    assert defaults == {"rl": {"mix": False}}
    loop.prepare_out(out, {"rl": {"steps": 3}}, resume=False)  # a run.json written before `mix` existed
    loop.prepare_out(out, {"rl": {"steps": 3, "mix": False}}, resume=True, defaults=defaults)
    with pytest.raises(ValueError, match=r"settings differ from the saved run in rl\.mix$"):
        loop.prepare_out(out, {"rl": {"steps": 3, "mix": True}}, resume=True, defaults=defaults)
    with pytest.raises(ValueError, match=r"settings differ from the saved run in rl\.mix, rl\.steps$"):
        loop.prepare_out(out, {"rl": {"steps": 4, "mix": True}}, resume=True, defaults=defaults)
    with pytest.raises(ValueError, match=r"in rl\.mix$"):  # with no default known, a missing setting differs
        loop.prepare_out(out, {"rl": {"steps": 3, "mix": False}}, resume=True)
    with pytest.raises(ValueError, match=r"in grpo$"):  # a whole section added
        loop.prepare_out(out, {"rl": {"steps": 3}, "grpo": {}}, resume=True, defaults=defaults)


def test_resume_refuses_a_run_json_or_metrics_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    loop.prepare_out(str(out), {"data": {}}, resume=False)
    for text in ("[1, 2]", '{"data": 5}', "{bad", "\udcff"):
        (out / "run.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ValueError, match="run.json is not a run.json this program wrote"):
            loop.prepare_out(str(out), {"data": {}}, resume=True)
    log = out / "metrics.jsonl"
    for line in ("[1]", '{"loss": 1}', '{"step": "1"}', "{bad"):
        log.write_text('{"step": 1, "loss": NaN}\n' + line + "\n")
        with pytest.raises(ValueError, match="metrics.jsonl:2 is not a metrics line of this program"):
            loop.truncate_log(str(log), 1)
    log.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 0.5}\n')
    loop.truncate_log(str(log), 1)  # a diverged (NaN) loss is kept as logged
    assert log.read_text() == '{"step": 1, "loss": NaN}\n' and loop.last_metrics(str(out))["step"] == 1
    log.write_text("")
    assert loop.last_metrics(str(out)) == {}  # a resumed run with no step left: the closing line says "none"


def test_train_on_text_uses_the_default_models_tokenizer(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "1+2=3"}) + "\n" + json.dumps({"text": "1+2=\u00e9"}) + "\n")
    assert main(_train_args(tmp_path / "out", data)) == 2  # the shipped model's tokenizer reads line 1 ...
    err = capsys.readouterr().err
    assert "has none" not in err
    assert f"{data}:2: the tokenizer has no token for '\u00e9' (character 4 of the text)" in err  # ... not line 2


def test_train_refuses_a_seq_len_beyond_the_context(tmp_path, text_data, capsys):
    assert main(_train_args(tmp_path / "out", text_data, "--seq-len", "4096")) == 2
    assert "--seq-len 4096 exceeds the model's max_position_embeddings=1024" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_batch_beyond_memory_before_writing(tmp_path, text_data, capsys):
    out = tmp_path / "out"
    assert main(_train_args(out, text_data, "--batch-size", str(10**12))) == 2
    err = capsys.readouterr().err
    assert "a train step of 1,000,000,000,000 x 16 tokens needs" in err and "GiB free on the host" in err
    assert not out.exists()
