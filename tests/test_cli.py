"""The command-line convention (lfi_jax.cli): one `error:` line and exit 2 for user errors,
tracebacks for bugs, config files and `--config.a.b=value` overrides."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from lfi_jax.cli import add_config_flags, add_debug_flag, config_from_args, error_message, run_cli
from lfi_jax.config import load_config_file, nearest_keys, parse_tuple, set_key, split_config_spec
from lfi_jax.errors import ConfigKeyError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_ENTRY_POINT = textwrap.dedent(
    """
    import argparse
    from lfi_jax.cli import add_config_flags, config_from_args, run_cli

    def main(argv):
        parser = argparse.ArgumentParser(prog="tiny")
        add_config_flags(parser)
        parser.add_argument("--workdir", default="")
        args = parser.parse_args(argv)
        config = config_from_args(args)
        print(config.total_steps, config.data.eval_splits, args.workdir)

    run_cli(main)
    """
)


def _config_main(argv):
    parser = argparse.ArgumentParser(prog="tiny")
    add_config_flags(parser)
    add_debug_flag(parser)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    return config_from_args(args), args


def _run(fn, argv, capsys):
    code = run_cli(fn, argv, exit=False)
    return code, capsys.readouterr().err


def test_unknown_override_key_subprocess_one_line_exit_2(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(TINY_ENTRY_POINT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, str(script), "--config=configs/demo.py:ivit,runlocal", "--config.model.foo=1", "--workdir=w"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: unknown config key 'model.foo'")
    assert "nearest valid keys: model." in lines[0] and "--config.model.foo=1" in lines[0]
    assert r.stdout == ""


def test_overrides_apply_in_order_with_coercion(capsys):
    config, args = _config_main(
        [
            "--config=configs/demo.py:ivit,runlocal",
            "--config.total_steps=9",
            "--workdir",
            "w",
            "--config.optim.lr",
            "2",  # the space form; an int for a float key
            "--config.data.eval_splits=val,test",  # the comma form
            "--config.model.interaction_queries=false",
            "--config.mesh.shape=-1,1",
            "--config.data.options.spurious_p=0.25",  # a new source option
            "--config.total_steps=11",  # later wins
        ]
    )
    assert args.workdir == "w"
    assert config.total_steps == 11 and isinstance(config.total_steps, int)
    assert config.optim.lr == 2.0 and isinstance(config.optim.lr, float)
    assert config.data.eval_splits == ("val", "test")
    assert config.model.interaction_queries is False
    assert config.mesh.shape == (-1, 1)
    assert config.data.options.spurious_p == 0.25


@pytest.mark.parametrize(
    "text,expected",
    [("('val',)", ("val",)), ("val", ("val",)), ("val,", ("val",)), ("a, b", ("a", "b")), ("", ()),
     ("(0.5, 1.0)", (0.5, 1.0)), ("1,2", (1, 2)), ("[3]", (3,))],
)
def test_tuple_override_forms(text, expected):
    assert parse_tuple(text) == expected
    c = load_config_file("demo", "ivit")
    set_key(c, "data.eval_splits", text)
    assert c.data.eval_splits == expected


def test_bool_and_number_coercion_errors_name_the_key():
    c = load_config_file("demo", "ivit")
    for text, value in (("True", True), ("no", False), ("1", True), ("OFF", False)):
        set_key(c, "async_checkpointing", text)
        assert c.async_checkpointing is value
    with pytest.raises(UserError, match=r"config key 'async_checkpointing': cannot set 'maybe' \(expected a boolean"):
        set_key(c, "async_checkpointing", "maybe")
    with pytest.raises(UserError, match="config key 'batch_size': cannot set 1.5 .expected an integer"):
        set_key(c, "batch_size", "1.5")
    with pytest.raises(UserError, match="config key 'optim.lr'"):
        set_key(c, "optim.lr", "fast")
    set_key(c, "optim.grad_clip_norm", "inf")
    assert c.optim.grad_clip_norm == float("inf")
    set_key(c, "batch_size", "32.0")
    assert c.batch_size == 32 and isinstance(c.batch_size, int)


def test_unknown_keys_name_the_nearest_valid_keys():
    c = load_config_file("demo", "ivit")
    # hand-picked: a typo, an abbreviation, a key in the wrong group, a misspelt group
    assert nearest_keys(c, "teacher.stor")[0] == "teacher.store"
    assert nearest_keys(c, "optim.learning_rate")[0] == "optim.lr"
    assert nearest_keys(c, "optim.label_smoothing")[0] == "loss.label_smoothing"
    assert nearest_keys(c, "optimm.lr")[0] == "optim.lr"
    assert all(k.startswith("model.") for k in nearest_keys(c, "model.foo"))
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'optimm.lr' \('optimm' does not exist\)") as e:
        set_key(c, "optimm.lr", "1")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(ConfigKeyError, match=r"'total_steps.x'.*'total_steps' is not a group"):
        set_key(c, "total_steps.x", "1")


def test_config_argument_that_does_not_parse_is_one_line(capsys):
    code, err = _run(_config_main, ["--config=configs/demo.py:resnet"], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: config configs/demo.py:resnet: unknown config argument 'resnet'")
    code, err = _run(_config_main, ["--config=configs/nope.py"], capsys)
    assert code == 2 and err.count("\n") == 1 and "config file not found: configs/nope.py" in err
    code, err = _run(_config_main, ["--config=demo:ivit", "--config.total_steps"], capsys)
    assert code == 2 and err == "error: override --config.total_steps has no value (write --config.total_steps=VALUE)\n"
    code, err = _run(_config_main, ["--config=demo:ivit", "--config.total_steps=abc"], capsys)
    assert code == 2 and err.count("\n") == 1 and "'total_steps'" in err and "--config.total_steps=abc" in err


def test_broken_config_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    with pytest.raises(UserError, match=f"config file {bad} does not load: SyntaxError"):
        load_config_file(str(bad))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no get_config"):
        load_config_file(str(empty))
    noarg = tmp_path / "noarg.py"
    noarg.write_text("def get_config():\n    return None\n")
    with pytest.raises(UserError, match="refused the argument"):
        load_config_file(str(noarg), "x")


def test_config_spec_split():
    assert split_config_spec("configs/demo.py:ivit,runlocal") == ("configs/demo.py", "ivit,runlocal")
    assert split_config_spec("configs/demo.py") == ("configs/demo.py", None)
    assert split_config_spec("demo:vit") == ("demo", "vit")
    assert split_config_spec("configs/pacs.py:") == ("configs/pacs.py", "")


def test_overrides_without_config_file(capsys):
    def main(argv):
        parser = argparse.ArgumentParser(prog="tiny")
        add_config_flags(parser, required=False)
        return config_from_args(parser.parse_args(argv))

    code, err = _run(main, ["--config.total_steps=3"], capsys)
    assert code == 2 and err == "error: --config.total_steps given without --config=FILE\n"


def test_run_cli_exit_codes_and_messages(capsys):
    def raises(exc):
        def main(argv):
            raise exc

        return main

    code, err = _run(raises(UserError("model.num_classes=7 but the data has 10 classes")), [], capsys)
    assert (code, err) == (2, "error: model.num_classes=7 but the data has 10 classes\n")
    code, err = _run(raises(KeyError("unknown split 'x'")), [], capsys)
    assert (code, err) == (2, "error: unknown split 'x'\n")
    code, err = _run(raises(FileNotFoundError("image file not found: /x.png")), [], capsys)
    assert (code, err) == (2, "error: image file not found: /x.png\n")
    code, err = _run(raises(ValueError("two\n  lines")), [], capsys)
    assert (code, err) == (2, "error: two lines\n")
    code, err = _run(raises(NotADirectoryError("not a directory: /x")), [], capsys)
    assert code == 2
    # a bug: the traceback, exit 1
    code, err = _run(raises(ZeroDivisionError("boom")), [], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and err.rstrip().endswith("ZeroDivisionError: boom")
    # --debug: the traceback for user errors too, still the error line and exit 2
    code, err = _run(raises(UserError("bad key")), ["--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("error: bad key")
    # Ctrl-C: one line, exit 130, with the entry point's note
    code = run_cli(raises(KeyboardInterrupt()), [], exit=False, interrupt_note=lambda: "shards 0-3 saved")
    assert (code, capsys.readouterr().err) == (130, "interrupted: shards 0-3 saved\n")
    code, err = _run(raises(KeyboardInterrupt()), [], capsys)
    assert (code, err) == (130, "interrupted\n")


def test_run_cli_passes_argv_and_return_code(capsys):
    seen = []

    def main(argv):
        seen.append(argv)
        return 3

    assert run_cli(main, ["a", "--debug", "b"], exit=False) == 3
    assert seen == [["a", "b"]]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: None, [])
    assert e.value.code == 0
    # argparse's own usage error keeps its exit code 2
    code, err = _run(lambda argv: _config_main(argv), ["--workdir=w"], capsys)
    assert code == 2 and "the following arguments are required: --config" in err


def test_error_message_forms():
    assert error_message(KeyError("x")) == "KeyError: 'x'"
    assert error_message(KeyError("no such split 'x'")) == "no such split 'x'"
    assert error_message(ConfigKeyError("unknown config key 'a'")) == "unknown config key 'a'"
    assert error_message(ValueError()) == "ValueError"
