"""What a user who gets something wrong sees: one line that names the problem, a non-zero exit, and
nothing half-written; not a traceback, a wrong port or a server that starts and fails every request."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import jsonl_texts, require_checkpoint
from tests.helpers import REPO, free_port


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error line a command ended with; fails if it printed a traceback or exited 0."""
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


# ---- data files ----

def test_jsonl_texts_names_the_line_of_the_first_bad_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"chosen": "a"}\n\n{"chosen": "b"}\n')
    assert jsonl_texts(f, "chosen") == ["a", "b"]
    f.write_text('{"chosen": "a"}\n{"chosen": "b"\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not JSON"):
        jsonl_texts(f, "chosen")
    f.write_text('{"chosen": "a"}\n["chosen"]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not a JSON object"):
        jsonl_texts(f, "chosen")
    f.write_text('{"chosen": "a"}\n{"chosen": 1}\n')
    with pytest.raises(ValueError, match=r'd.jsonl:2: a record without a "chosen" text'):
        jsonl_texts(f, "chosen")
    f.write_text('{"rejected": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: a record without"):
        jsonl_texts(f, "chosen")


def test_require_checkpoint_says_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--model .*nope: no such folder"):
        require_checkpoint(tmp_path / "nope", "--model")
    with pytest.raises(SystemExit, match=r"--model .*: not a Hugging Face checkpoint folder \(no config.json\)"):
        require_checkpoint(tmp_path, "--model")
    (tmp_path / "config.json").write_text("{}")
    assert require_checkpoint(tmp_path, "--model") == tmp_path


def test_online_and_web_prompts_name_the_bad_line(tmp_path):
    from sim.traffic import first_turn_prompts
    f = tmp_path / "p.jsonl"
    f.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}\n{"chosen": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: a record without"):
        first_turn_prompts(f)


# ---- make_policy ----

def test_make_policy_refuses_a_folder_that_holds_something_and_leaves_it_as_it_was(tmp_path):
    from serve.make_policy import PolicySpec, build
    out = tmp_path / "policy"
    out.mkdir()
    (out / "sft.json").write_text('{"steps": 265}')   # an SFT'd policy's marker: run.sh would skip SFT
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        build(PolicySpec(out=out, size="tiny", corpus=Path("builtin")))
    assert [p.name for p in out.iterdir()] == ["sft.json"]
    empty = tmp_path / "empty"
    empty.mkdir()   # an empty folder is fine, and the build leaves no .tmp beside it
    build(PolicySpec(out=empty, size="tiny", vocab_size=300, corpus=Path("builtin")))
    assert (empty / "config.json").is_file() and (empty / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "policy"]   # no temporary folder left beside it


def test_make_policy_brings_back_a_policy_a_crash_left_aside_and_refuses_to_overwrite_it(tmp_path):
    # train.sft's save renames the old folder to <out>.replaced before the new one takes its place; a crash
    # between the two leaves no <out>: the build must not take that for a free folder and delete the policy
    from serve.make_policy import PolicySpec, build
    aside = tmp_path / "policy.replaced"
    aside.mkdir()
    (aside / "sft.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        build(PolicySpec(out=tmp_path / "policy", size="tiny", corpus=Path("builtin")))
    assert (tmp_path / "policy" / "sft.json").is_file() and not aside.exists()


def test_make_policy_refuses_a_corpus_without_text(tmp_path):
    from serve.make_policy import corpus_lines
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="holds no text"):
        corpus_lines(tmp_path / "e.jsonl")
    (tmp_path / "o.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match="holds no text"):
        corpus_lines(tmp_path / "o.jsonl")
    (tmp_path / "b.jsonl").write_text('{"chosen": "x"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"b.jsonl:2: not JSON"):
        corpus_lines(tmp_path / "b.jsonl")


# ---- the policy loader ----

def test_a_checkpoint_without_its_tokenizer_is_refused_at_load(tiny_gpt2, tmp_path):
    # transformers builds an empty tokenizer from such a folder: the server started, and every request
    # then failed with "prompt: empty"
    from serve.loader import load_policy
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2, folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_policy(folder)


# ---- commands, as processes ----

def test_a_service_whose_port_is_taken_says_so_in_one_line():
    with socket.socket() as held:   # someone else's listener on the port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run("feedback.service", "--port", str(port), "--metrics-port", "0", "--bootstrap", f"127.0.0.1:{free_port()}",
                "--kafka-timeout-s", "0.5")
    assert one_line_error(r).startswith(f"python -m feedback.service: error: cannot listen on 127.0.0.1:{port}")


def test_the_client_reports_an_unreachable_server_in_one_line():
    r = run("serve.client", "--target", f"127.0.0.1:{free_port()}", "--prompt", "hi")
    assert one_line_error(r).startswith("python -m serve.client: UNAVAILABLE:")


def test_broker_commands_refuse_nonsense_counts_and_folders(tmp_path):
    r = run("feedback.broker", "start", "--brokers", "0", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "brokers must be >= 1, got 0" in r.stderr
    r = run("feedback.broker", "stop", "--data-dir", str(tmp_path / "never-started"))
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = run("feedback.broker", "stop", "--data-dir", str(tmp_path))   # a folder, nothing running in it
    assert r.returncode == 0 and "nothing to stop" in r.stdout


def test_sft_and_rm_commands_name_a_missing_model_folder(tmp_path):
    commands = {"sft": ["train.sft", "--model", str(tmp_path / "missing")],
                "rm_train": ["train.rm_train", "--out", str(tmp_path / "rm"), "--backbone", str(tmp_path)],
                "rm_eval": ["train.rm_eval", "--rm", str(tmp_path), "--data", "x"]}
    procs = {k: subprocess.Popen([sys.executable, "-m", *a], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, a in commands.items()}   # at once: each imports torch (~5 s)
    r = {k: subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=120)) for k, p in procs.items()}
    for k, p in procs.items():
        r[k].returncode = p.returncode
    assert one_line_error(r["sft"]) == f"--model {tmp_path / 'missing'}: no such folder"
    assert one_line_error(r["rm_train"]) == f"--backbone {tmp_path}: not a Hugging Face checkpoint folder (no config.json)"
    assert "not a reward-model folder" in one_line_error(r["rm_eval"])


def test_read_pairs_names_the_line_of_a_record_without_both_texts(tmp_path):
    from train.pairs_data import read_pairs
    f = tmp_path / "p.jsonl"
    f.write_text('{"chosen": "a", "rejected": "b"}\n\n{"chosen": "c"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: not a \{chosen, rejected\} record"):
        read_pairs(f)
    f.write_text('{"chosen": "a", "rejected": "b"}\n')
    assert read_pairs(f) == [("a", "b")]
    f.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(f)
