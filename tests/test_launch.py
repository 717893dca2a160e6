"""`moesaic launch`: the manifest's checks, the scripts rendered for SLURM, TPU VMs and local
processes (valid bash, the expected directives and command lines), and a local run of two
parties with two processes each that trains both branches and merges them."""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import ml_collections
import pytest

from moesaic.launch import cli, config_cli, jobs, manifest, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "moesaic/configs/manifest_example.py")


def _render(tmp_path, target: str, *overrides: str) -> dict[str, str]:
    m = manifest.load(EXAMPLE, list(overrides))
    paths = jobs.render(m, target, tmp_path / target)
    for path in paths:
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{path.name}: {check.stderr}"
        assert os.access(path, os.X_OK)
    return {p.name: p.read_text() for p in paths}


def test_manifest_example_loads_with_overrides():
    m = manifest.load(EXAMPLE, ["parties.code.resources.nodes=4", "merge.router=centroid"])
    assert m.party_names == ["code", "math"]
    code = m.party("code")
    assert code.resources.nodes == 4 and code.resources.local_processes == 4
    assert code.artifact == "runs/w/branches/code/artifact" and code.base == "runs/w/public"
    assert m.merge_args() == [
        "merge", "--base", "runs/w/public", "--branch", "runs/w/branches/code/artifact",
        "--branch", "runs/w/branches/math/artifact", "--router", "centroid", "--top-k", "2",
        "--out", "runs/w/merged"]
    assert manifest.distributed_args(1, "h:1", 0) == []
    assert manifest.distributed_args(2, "h:1", 1) == [
        "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]


@pytest.mark.parametrize("overrides, message", [
    (["merge.top_k=0"], "merge.top_k"),
    (["log_dir=my logs"], "log_dir: 'my logs': letters, digits"),
    (["parties.code.overrides=('train.steps=5',)", "merge.router=centroid"], None),
    (["merge.branches=('code', 'law')"], "merge.branches"),
    (["parties.code.resources.nodes=0"], "resources.nodes"),
    (["parties.math.workdir="], "parties.math: workdir is required"),
])
def test_manifest_errors_name_the_field(overrides, message):
    if message is None:  # the well-formed neighbour of a refused case
        manifest.load(EXAMPLE, overrides)
        return
    with pytest.raises(ValueError, match=message):
        manifest.load(EXAMPLE, overrides)


@pytest.mark.parametrize("override, message", [
    ("train.steps=True", "expected int, got 'True'"),
    ("model.capacity_factor=True", "expected float"),
    ("branch.frozen='^embed$'", "expected a list such as"),
    ("branch.frozen=5", "expected a list such as"),
])
def test_overrides_of_the_wrong_type_are_refused(override, message):
    config = config_cli.load_config_file(str(ROOT / "moesaic/configs/tiny.py"))
    with pytest.raises(ValueError, match=message):
        config_cli.apply_overrides(config, [override])


def test_overrides_take_the_absl_forms_and_configs_load_from_any_directory(tmp_path,
                                                                          monkeypatch):
    rest, overrides = config_cli.split_config_args(
        ["--workdir", "w", "--config.train.steps", "3", "--config.train.lr=0.1",
         "--config.train.warmup_steps", "-1"])
    assert rest == ["--workdir", "w"]
    assert overrides == ["train.steps=3", "train.lr=0.1", "train.warmup_steps=-1"]
    for argv in (["--config.train.steps"], ["--config.train.steps", "--workdir", "w"]):
        with pytest.raises(ValueError, match=r"--config.train.steps: no value; write "
                                             r"--config.train.steps=VALUE"):
            config_cli.split_config_args(argv)
    monkeypatch.chdir(tmp_path)  # the README's relative path, run from elsewhere
    assert config_cli.load_config_file("moesaic/configs/tiny.py:source=code").branch.source \
        == "code"
    with pytest.raises(FileNotFoundError, match=r"'moesaic/configs/nope.py' does not exist "
                                                r"\(looked in "):
        config_cli.load_config_file("moesaic/configs/nope.py")


def test_manifest_lists_must_be_lists():
    raw = manifest.config_cli.load_config_file(EXAMPLE).to_dict()
    raw["parties"]["code"]["overrides"] = "train.steps=5"  # tuple() would split its letters
    config = ml_collections.ConfigDict(raw)
    with pytest.raises(ValueError, match="parties.code.overrides: 'train.steps=5' must be a "
                                         "list of strings"):
        manifest.from_config(config)


def test_manifest_rejects_unknown_resources_and_empty_parties():
    config = manifest.config_cli.load_config_file(EXAMPLE)
    config.parties.code.resources.gpus = 8
    with pytest.raises(ValueError, match=r"parties.code: unknown resources \['gpus'\]"):
        manifest.from_config(config)
    config.parties = ml_collections.ConfigDict()
    with pytest.raises(ValueError, match="names no party"):
        manifest.from_config(config)


def test_slurm_scripts(tmp_path):
    files = _render(tmp_path, "slurm", "parties.math.resources.tasks_per_node=4",
                    "parties.math.overrides=('train.steps=7', 'model.remat=full')")
    assert sorted(files) == ["branch-code.sbatch", "branch-math.sbatch", "merge.sbatch",
                             "submit_all.sh"]
    code = files["branch-code.sbatch"]
    for line in ("#SBATCH --job-name=moesaic-code", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --time=24:00:00",
                 "#SBATCH --partition=gpu", "export PYTHONUNBUFFERED=1",
                 'MOESAIC_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                 '| head -n 1):12355"'):
        assert line + "\n" in code, line
    srun = [ln for ln in code.splitlines() if ln.startswith("srun ")]
    assert srun == [
        "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec \"$@\" "
        "--coordinator \"$MOESAIC_COORDINATOR\" --num-processes \"$SLURM_NTASKS\" "
        "--process-id \"$SLURM_PROCID\"' moesaic-task moesaic branch --config "
        "moesaic/configs/tiny.py --base runs/w/public --workdir runs/w/branches/code "
        "--config.branch.source=code --config.train.steps=300 --no-progress"]
    math = files["branch-math.sbatch"]
    assert "#SBATCH --ntasks-per-node=4\n" in math
    assert "--ntasks-per-node=4 --kill-on-bad-exit=1 --gpus-per-task=2 bash -c" in math
    assert "--config.train.steps=7 --config.model.remat=full --no-progress" in math
    merge = files["merge.sbatch"]
    assert "#SBATCH --nodes=1\n" in merge and "#SBATCH --partition=cpu\n" in merge
    assert ("srun moesaic merge --base runs/w/public --branch runs/w/branches/code/artifact "
            "--branch runs/w/branches/math/artifact --router learned-rows --top-k 2 "
            "--out runs/w/merged\n") in merge
    submit = files["submit_all.sh"]
    assert 'job_0=$(sbatch --parsable "$here/branch-code.sbatch")' in submit
    assert ('merge_job=$(sbatch --parsable --dependency=afterok:$job_0:$job_1 '
            '"$here/merge.sbatch")') in submit


def test_slurm_submit_all_chains_the_merge_after_every_branch(tmp_path):
    """submit_all.sh against a fake `sbatch` that records its arguments."""
    files_dir = tmp_path / "slurm"
    _render(tmp_path, "slurm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\n'
                    'n=$(wc -l < "$SBATCH_LOG"); echo "$((100 + n));cluster"\n')
    fake.chmod(0o755)
    log = tmp_path / "sbatch.log"
    proc = subprocess.run(["bash", str(files_dir / "submit_all.sh")], capture_output=True,
                          text=True, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                               "SBATCH_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls == [f"--parsable {files_dir}/branch-code.sbatch",
                     f"--parsable {files_dir}/branch-math.sbatch",
                     f"--parsable --dependency=afterok:101:102 {files_dir}/merge.sbatch"]
    assert "merge job 103 runs after 101 102" in proc.stdout
    assert (tmp_path / "logs").is_dir()


def test_tpu_vm_scripts(tmp_path):
    files = _render(tmp_path, "tpu-vm", "repo=/home/me/moesaic",
                    "parties.code.resources.tpu_project=my-proj",
                    "parties.code.env={'LIBTPU_INIT_ARGS': '--xla_tpu_x=1 $HOME'}")
    assert sorted(files) == ["branch-code.sh", "branch-math.sh", "merge.sh", "run_all.sh"]
    line = [ln for ln in files["branch-code.sh"].splitlines() if ln.startswith("gcloud")]
    assert line == [
        "gcloud compute tpus tpu-vm ssh code-v5p-16 --zone us-east5-a --project my-proj "
        "--worker=all --command=\"cd /home/me/moesaic && export PYTHONUNBUFFERED=1 && "
        "export LIBTPU_INIT_ARGS='--xla_tpu_x=1 \\$HOME' && export MOESAIC_DISTRIBUTED=auto "
        "&& moesaic branch --config "
        "moesaic/configs/tiny.py --base runs/w/public --workdir runs/w/branches/code "
        "--config.branch.source=code --config.train.steps=300 --no-progress\" 2>&1 "
        "| tee logs/branch-code.log"]
    # The remote command survives the local shell's quoting intact.
    remote = subprocess.run(["bash", "-c", "printf %s " + line[0].split("--command=")[1]
                             .split(" 2>&1")[0]], capture_output=True, text=True).stdout
    assert remote.startswith("cd /home/me/moesaic && export PYTHONUNBUFFERED=1 && export "
                             "LIBTPU_INIT_ARGS='--xla_tpu_x=1 $HOME' && export "
                             "MOESAIC_DISTRIBUTED=auto && moesaic branch")
    assert "--zone europe-west4-b --worker=all" in files["branch-math.sh"]
    assert '"$here/branch-code.sh" & pids[code]=$!' in files["run_all.sh"]
    assert "moesaic merge --base runs/w/public" in files["merge.sh"]


def test_tpu_vm_needs_a_tpu_name(tmp_path, capsys):
    argv = ["launch", "render", EXAMPLE, "--target", "tpu-vm", "--out", str(tmp_path),
            "--config.parties.math.resources.tpu_name="]
    from moesaic.launch import cli

    assert cli.main(argv) == 2
    assert "party 'math' has no resources.tpu_name" in capsys.readouterr().err


def test_local_scripts_start_n_processes_on_loopback(tmp_path):
    files = _render(tmp_path, "local", "parties.math.resources.processes=3",
                    "parties.code.resources.processes=1")
    code, math = files["branch-code.sh"], files["branch-math.sh"]
    assert "--coordinator" not in code and "for process_id in $(seq 0 $((1 - 1)))" in code
    assert ('--no-progress --coordinator 127.0.0.1:12356 --num-processes 3 --process-id '
            '"$process_id" > "logs/branch-math.$process_id.log" 2>&1 &') in math
    assert "for process_id in $(seq 0 $((3 - 1)))" in math


def test_local_script_runs_every_process_id(tmp_path):
    """The rendered local script, with a stand-in `moesaic` that records its arguments."""
    _render(tmp_path, "local", "command=" + str(tmp_path / "fake-moesaic"))
    fake = tmp_path / "fake-moesaic"
    fake.write_text('#!/bin/bash\necho "$@"\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(tmp_path / "local/branch-math.sh")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for process_id in (0, 1):
        args = (tmp_path / f"logs/branch-math.{process_id}.log").read_text().split()
        assert args[-6:] == ["--coordinator", "127.0.0.1:12356", "--num-processes", "2",
                             "--process-id", str(process_id)]
        assert args[:2] == ["branch", "--config"]


def test_local_script_stops_the_other_processes_when_one_fails(tmp_path):
    """A peer of a failed process would wait for it at its next barrier: it is stopped."""
    _render(tmp_path, "local", "command=" + str(tmp_path / "fake-moesaic"))
    fake = tmp_path / "fake-moesaic"
    fake.write_text('#!/bin/bash\nfor a; do last=$a; done\n'
                    'if [ "$last" = 1 ]; then exit 3; fi\nexec sleep 60\n')
    fake.chmod(0o755)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(tmp_path / "local/branch-math.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "party math failed" in proc.stderr
    assert time.monotonic() - started < 20


def _write_manifest(path: pathlib.Path, tmp: pathlib.Path, data: pathlib.Path, base: str,
                    overrides: list[str]) -> None:
    parties = "\n".join(
        f"    m.parties.{name} = ml_collections.ConfigDict(dict(\n"
        f"        config='moesaic/configs/tiny.py', source='{name}', data={str(data)!r},\n"
        f"        workdir={str(tmp / name)!r}, overrides={overrides!r},\n"
        f"        resources=dict(processes=2)))"
        for name in ("code", "math"))
    path.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    m = ml_collections.ConfigDict()\n"
        f"    m.base = {base!r}\n    m.env = {{'JAX_PLATFORMS': 'cpu'}}\n"
        "    m.parties = ml_collections.ConfigDict()\n"
        f"{parties}\n"
        f"    m.merge = ml_collections.ConfigDict(dict(router='learned-rows', top_k=2,\n"
        f"        branches=['code', 'math'], out={str(tmp / 'merged')!r}))\n    return m\n")


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
        "model.d_ff=64", "data.seq_len=16", "data.global_batch=4", "train.steps=3",
        "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=3",
        "branch.stats_batches=1"]


def _tiny_base(path: pathlib.Path) -> None:
    from flax import nnx

    from moesaic.configs import tiny
    from moesaic.launch import config_cli
    from moesaic.model import io
    from moesaic.model.config import ModelConfig
    from moesaic.model.transformer import Decoder

    config = tiny.get_config()
    config_cli.apply_overrides(config, TINY)
    cfg = ModelConfig.from_config(config.model)
    io.save_model(path, Decoder(cfg, rngs=nnx.Rngs(0)), {"kind": "public"})


@pytest.mark.slow
def test_local_run_trains_two_parties_and_merges(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    from moesaic.data.corpora import build_embedded
    from moesaic.model import io

    data = tmp_path / "data"
    build_embedded(data, size="smoke")
    _tiny_base(tmp_path / "public")
    spec = tmp_path / "manifest.py"
    _write_manifest(spec, tmp_path, data, str(tmp_path / "public"), TINY)
    proc = subprocess.run(
        [sys.executable, "-m", "moesaic.launch.cli", "launch", "run", str(spec),
         "--target", "local", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, cwd=ROOT, timeout=400,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    for name in ("code", "math"):
        assert io.read_meta(tmp_path / name / "artifact")["source"] == name
        # Both processes of the party ran and trained (process 0 logs the parameters).
        assert (tmp_path / "logs" / f"branch-{name}.1.log").exists()
        assert "parameters:" in (tmp_path / "logs" / f"branch-{name}.0.log").read_text()
    meta = io.read_meta(tmp_path / "merged")
    assert meta["model"]["n_experts"] == 3 and meta["model"]["top_k"] == 2
    assert "merged model:" in proc.stdout


def test_local_run_failure_shows_the_party_log_tail(tmp_path, capsys):
    """A party with no base (and no data) fails; the run stops before the merge and prints the
    failing party's log tail."""
    spec = tmp_path / "manifest.py"
    _write_manifest(spec, tmp_path, tmp_path / "data", str(tmp_path / "missing-base"),
                    TINY)
    m = manifest.load(str(spec), ["parties.code.resources.processes=1",
                                  "merge.branches=('code',)"])
    code = jobs.run_local(m, log_dir=tmp_path / "logs", poll_seconds=0.1)
    err = capsys.readouterr().err
    assert code == 1
    assert "branch 'code' failed (exit code 2, process 0)" in err
    log = (tmp_path / "logs" / "branch-code.0.log").read_text().strip().splitlines()
    assert log[-1].startswith("error:") and log[-1] in err
    assert "run `moesaic pretrain` first" in err  # the branch job's advice, passed on
    assert not (tmp_path / "merged").exists()


def test_run_blames_the_process_that_failed_not_the_ones_it_stopped(tmp_path):
    """Process 1 fails while process 0 still runs; process 0, then stopped (exit -15), must
    not be the one named, nor its empty log the one shown."""
    logs = [tmp_path / f"branch-x.{i}.log" for i in range(2)]
    job = jobs._Job("branch 'x'", [[sys.executable, "-c", "import time; time.sleep(60)"],
                                   [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]],
                    logs, dict(os.environ))
    job.start(None)
    deadline = time.monotonic() + 60
    while (code := job.poll()) is None:
        assert time.monotonic() < deadline, "process 1 never failed"
        time.sleep(0.05)
    assert code == 3 and job.procs[0].returncode == -15
    message = job.failure(code)
    assert message.startswith("branch 'x' failed (exit code 3, process 1)")
    assert str(logs[1]) in message and message.endswith("boom")


def test_each_party_gets_its_own_coordinator_port(tmp_path):
    """SLURM jobs of two parties may share a first node, as local ones share loopback."""
    slurm, local = _render(tmp_path, "slurm"), _render(tmp_path, "local")
    for index, name in enumerate(("code", "math")):
        port = 12355 + index
        assert f'| head -n 1):{port}"\n' in slurm[f"branch-{name}.sbatch"]
        assert f"--coordinator 127.0.0.1:{port} " in local[f"branch-{name}.sh"]


# ---- the `moesaic` command ---------------------------------------------------------------

def _parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"moesaic {name}")
    importlib.import_module(cli.COMMANDS[name][0]).register(parser)
    return parser


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
    argv = shlex.split(command)
    if argv[0] == "python":
        script = (ROOT / argv[1]).read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'add_argument("{flag}"' in script, f"{where}: {argv[1]} has no {flag}"
        return
    name, (rest, overrides) = argv[1], config_cli.split_config_args(argv[2:])
    assert not overrides or name in cli.TAKES_OVERRIDES, where
    args = _parser(name).parse_args(rest)  # a missing or unknown flag exits here
    if name == "launch":
        manifest.load(args.manifest, overrides)
        return
    config_cli.resolve(args.config, overrides)
    if name == "plan":
        plan.parse_mesh(args.mesh), plan.parse_bytes(args.hbm)


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
