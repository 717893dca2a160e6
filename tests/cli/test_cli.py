"""The `moesaic` command: config files and --config overrides, the commands that take them
and those that refuse them, the commands the config docstrings show, and the distributed
start-up flags."""

from __future__ import annotations

import argparse
import ast
import pathlib
import re
import shlex

import pytest

from moesaic.cli import args as cli_args
from moesaic.cli import main as cli
from moesaic.configs import loading
from moesaic.launch import manifest, plan

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, message", [
    ("train.steps=True", "expected int, got 'True'"),
    ("model.capacity_factor=True", "expected float"),
    ("branch.frozen='^embed$'", "expected a list such as"),
    ("branch.frozen=5", "expected a list such as"),
])
def test_overrides_of_the_wrong_type_are_refused(override, message):
    config = loading.load_config_file(str(ROOT / "moesaic/configs/tiny.py"))
    with pytest.raises(ValueError, match=message):
        loading.apply_overrides(config, [override])


def test_overrides_take_the_absl_forms_and_configs_load_from_any_directory(tmp_path,
                                                                          monkeypatch):
    rest, overrides = cli_args.split_config_args(
        ["--workdir", "w", "--config.train.steps", "3", "--config.train.lr=0.1",
         "--config.train.warmup_steps", "-1"])
    assert rest == ["--workdir", "w"]
    assert overrides == ["train.steps=3", "train.lr=0.1", "train.warmup_steps=-1"]
    for argv in (["--config.train.steps"], ["--config.train.steps", "--workdir", "w"]):
        with pytest.raises(ValueError, match=r"--config.train.steps: no value; write "
                                             r"--config.train.steps=VALUE"):
            cli_args.split_config_args(argv)
    monkeypatch.chdir(tmp_path)  # the README's relative path, run from elsewhere
    assert loading.load_config_file("moesaic/configs/tiny.py:source=code").branch.source \
        == "code"
    with pytest.raises(FileNotFoundError, match=r"'moesaic/configs/nope.py' does not exist "
                                                r"\(looked in "):
        loading.load_config_file("moesaic/configs/nope.py")



# ---- the `moesaic` command ---------------------------------------------------------------

def _parser(name: str) -> argparse.ArgumentParser:
    return cli.command_parser(name)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_its_module_in_the_cli_package(name):
    """Every command is parsed in moesaic/cli/, by a module named after what is typed."""
    module = cli.COMMANDS[name][0]
    assert module.startswith("moesaic.cli."), module
    assert name in cli._available(), f"{module} is missing"
    assert _parser(name).prog == f"moesaic {name}"


def test_train_and_pretrain_run_one_job_and_say_what_differs():
    from moesaic.cli import train

    assert cli.COMMANDS["train"][0] == cli.COMMANDS["pretrain"][0] == train.__name__
    for name, other in (("train", "pretrain"), ("pretrain", "train")):
        helptext = _parser(name).format_help()
        assert f"The same job as `moesaic {other}`" in " ".join(helptext.split())
    assert _parser("pretrain").parse_args(["--config", "c.py", "--workdir", "w"]).embedded_size \
        == "default"
    assert _parser("train").parse_args(["--workdir", "w"]).embedded_size == "smoke"


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n not in cli.TAKES_OVERRIDES])
def test_commands_without_a_config_refuse_overrides(name, capsys):
    """Before, `moesaic eval ... --config.x=y` ran and ignored the override."""
    assert "--config" not in _parser(name)._option_string_actions  # it really reads none
    assert cli.main([name, "--help", "--config.train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moesaic {name}: error: --config.train.steps=5: `moesaic {name}` "
                          "reads no config")


def test_commands_that_take_overrides_read_a_config():
    for name in cli.TAKES_OVERRIDES:
        options = _parser(name)._option_string_actions
        assert "--config" in options or name == "launch", name  # launch: its manifest


def _docstring_commands(path: pathlib.Path) -> list[str]:
    """The commands a config file's docstring shows: indented lines and `inline` ones."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""  # indents kept
    doc = re.sub(r"\\\n\s*", "", doc)
    lines = [ln.strip() for ln in doc.splitlines() if re.match(r" {4}(moesaic|python) ", ln)]
    inline = re.findall(r"`((?:moesaic|python) [^`]+)`", doc)
    return [" ".join(c.split()) for c in lines + inline]


DOC_COMMANDS = [(p.name, c) for p in sorted((ROOT / "moesaic/configs").glob("*.py"))
                for c in _docstring_commands(p)]


def test_config_docstrings_show_commands():
    assert {name for name, _ in DOC_COMMANDS} >= {"tiny.py", "small.py", "olmo2_7b.py",
                                                   "flexolmo_7x7b.py", "manifest_example.py"}


@pytest.mark.parametrize("where, command", DOC_COMMANDS)
def test_config_docstring_commands_parse(where, command, monkeypatch):
    """Every command a config's docstring shows parses, and its config (with overrides)
    resolves; before, tiny.py's `moesaic train` had no --workdir and small.py passed the
    bench a --config it does not take."""
    monkeypatch.chdir(ROOT)
    _check_command(where, shlex.split(command))


def _docs_commands(path: pathlib.Path) -> list[str]:
    """The `moesaic ...` lines of a markdown file's code blocks (continuations joined, comments
    cut), but for usage lines that show alternatives (`A|B`) or optional parts (`[...]`)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("moesaic ") and not re.search(r"[|\[]", line):
                found.append(" ".join(line.split()))
    return found


DOCS_COMMANDS = [(str(p.relative_to(ROOT)), c)
                 for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
                 for c in _docs_commands(p)]


def test_docs_show_commands():
    assert {where for where, _ in DOCS_COMMANDS} >= {"README.md", "docs/demo.md"}


@pytest.mark.parametrize("where, command", DOCS_COMMANDS)
def test_docs_commands_parse(where, command, monkeypatch):
    """Every command the README and docs/ show in a code block parses, with its config."""
    monkeypatch.chdir(ROOT)
    _check_command(where, shlex.split(command))


def _check_command(where: str, argv: list[str]) -> None:
    if argv[0] == "python":
        script = (ROOT / argv[1]).read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'add_argument("{flag}"' in script, f"{where}: {argv[1]} has no {flag}"
        return
    name, (rest, overrides) = argv[1], cli_args.split_config_args(argv[2:])
    assert not overrides or name in cli.TAKES_OVERRIDES, where
    args = _parser(name).parse_args(rest)  # a missing or unknown flag exits here
    if name == "launch":  # a manifest the docs name only as an example is not loaded
        if (ROOT / args.manifest.partition(":")[0]).is_file():
            manifest.load(args.manifest, overrides)
        return
    if getattr(args, "config", None):  # merge, eval and the like read no config
        loading.resolve(args.config, overrides)
    if name == "plan":
        plan.parse_mesh(args.mesh), plan.parse_bytes(args.hbm)


def test_eval_prints_the_share_of_router_weight_and_names_what_it_averages():
    """Before, `moesaic eval` printed each expert's share of top-k slots (a domain whose
    tokens all put 0.9 of their weight on the public expert looked evenly routed at top-2)
    and an "average" that silently included public."""
    from moesaic.cli import eval as cli_eval

    routing = {"token_share": [[0.5, 0.5]], "weight_share": [[0.9, 0.1]],
               "experts": ["public", "code"]}
    results = {"code": {"nll": 1.0, "ppl": 2.0, "bpb": 1.5, "tokens": 10, "routing": routing},
               "public": {"nll": 3.0, "ppl": 4.0, "bpb": 2.5, "tokens": 10}}
    text = cli_eval.format_results(results)
    assert "share of router weight per layer (public, code)" in text
    assert "0.900  0.100" in text and "0.500" not in text
    assert "mean over code, public (every domain)" in text
    private = cli_eval.format_results(results, ["code"])
    assert "   average   1.0000     2.000   1.5000  mean over code (--average-over)" in private
    with pytest.raises(ValueError, match="--average-over law: not evaluated"):
        cli_eval._average_over("code,law", ["code", "public"])


@pytest.mark.parametrize("override", ["--config.nope=3", "--config.train.steps=abc"])
def test_training_commands_refuse_a_bad_override_in_one_line(tmp_path, capsys, override):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--config", "moesaic/configs/tiny.py", "--workdir",
                  str(tmp_path), override])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: config ") and err.count("\n") == 1


def test_a_tpu_vm_worker_starts_jax_distributed_from_the_marker(monkeypatch):
    from moesaic.branch_train import distributed

    for name in ("SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "MOESAIC_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() == ""
    monkeypatch.setenv("MOESAIC_DISTRIBUTED", "auto")
    assert distributed.detected_cluster() == "tpu"


@pytest.mark.parametrize("coordinator, processes, process_id", [
    ("", 2, 0), ("localhost:1234", 1, 0), ("localhost:1234", 2, -1), ("localhost:1234", 2, 2)])
def test_a_multi_process_start_needs_a_coordinator_and_an_id_below_the_count(
        coordinator, processes, process_id):
    from moesaic.branch_train import distributed

    args = argparse.Namespace(coordinator=coordinator, num_processes=processes,
                              process_id=process_id)
    with pytest.raises(ValueError, match=r"--process-id in \[0, N\)"):
        distributed.initialize(args)
