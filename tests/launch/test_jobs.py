"""`moesaic launch`: the manifest's checks, the scripts rendered for SLURM, TPU VMs and local
processes (valid bash, the expected directives and command lines), and a local run of two
parties with two processes each that trains both branches and merges them."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import ml_collections
import pytest

from moesaic.cli import main as cli
from moesaic.configs import loading
from moesaic.launch import jobs, manifest

ROOT = pathlib.Path(__file__).resolve().parents[2]
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
    (["log_dir=~/lg"], "log_dir: '~/lg': `~` is not expanded .* give an absolute or relative"),
    (["log_dir=/tmp/lg", "repo=~/moesaic"], None),
    (["repo=~me/moesaic"], r"repo: '~me/moesaic': only a leading `~/`"),
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


def test_manifest_lists_must_be_lists():
    raw = manifest.loading.load_config_file(EXAMPLE).to_dict()
    raw["parties"]["code"]["overrides"] = "train.steps=5"  # tuple() would split its letters
    config = ml_collections.ConfigDict(raw)
    with pytest.raises(ValueError, match="parties.code.overrides: 'train.steps=5' must be a "
                                         "list of strings"):
        manifest.from_config(config)


def test_manifest_rejects_unknown_resources_and_empty_parties():
    config = manifest.loading.load_config_file(EXAMPLE)
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


@pytest.mark.parametrize("overrides", [(), ("merge.branches=('math',)",)])
def test_slurm_submit_all_chains_the_merge_after_every_branch(tmp_path, overrides):
    """submit_all.sh against a fake `sbatch` that records its arguments. A party the merge
    leaves out is still submitted (before, it was rendered but never submitted)."""
    files_dir = tmp_path / "slurm"
    files = _render(tmp_path, "slurm", *overrides)
    merged = [w for w in files["merge.sbatch"].split() if w.startswith("runs/w/branches/")]
    expected = ("math",) if overrides else ("code", "math")
    assert merged == [f"runs/w/branches/{name}/artifact" for name in expected]
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
    from moesaic.model import checkpoint
    from moesaic.model.config import ModelConfig
    from moesaic.model.transformer import Decoder

    config = tiny.get_config()
    loading.apply_overrides(config, TINY)
    cfg = ModelConfig.from_config(config.model)
    checkpoint.save_model(path, Decoder(cfg, rngs=nnx.Rngs(0)), {"kind": "public"})


@pytest.mark.slow
def test_local_run_trains_two_parties_and_merges(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    from moesaic.data.corpora import build_embedded
    from moesaic.model import checkpoint

    data = tmp_path / "data"
    build_embedded(data, size="smoke")
    _tiny_base(tmp_path / "public")
    spec = tmp_path / "manifest.py"
    _write_manifest(spec, tmp_path, data, str(tmp_path / "public"), TINY)
    proc = subprocess.run(
        [sys.executable, "-m", "moesaic.cli.main", "launch", "run", str(spec),
         "--target", "local", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, cwd=ROOT, timeout=400,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    for name in ("code", "math"):
        assert checkpoint.read_meta(tmp_path / name / "artifact")["source"] == name
        # Both processes of the party ran and trained (process 0 logs the parameters).
        assert (tmp_path / "logs" / f"branch-{name}.1.log").exists()
        assert "parameters:" in (tmp_path / "logs" / f"branch-{name}.0.log").read_text()
    meta = checkpoint.read_meta(tmp_path / "merged")
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
    code = jobs.run_local(m, log_dir=tmp_path / "logs", parallel=1, poll_seconds=0.1)
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


def test_a_home_relative_repo_is_expanded_by_the_job_host(tmp_path):
    """`repo='~/proj'` rendered as `cd ~/proj`, not `cd '~/proj'`, which failed."""
    files = _render(tmp_path, "local", "repo=~/proj", "command=" + str(tmp_path / "fake"))
    tpu = _render(tmp_path, "tpu-vm", "repo=~/my proj")
    assert "\ncd ~/proj\n" in files["branch-code.sh"] and "\ncd ~/proj\n" in files["merge.sh"]
    assert "--command=\"cd ~/'my proj' && export" in tpu["branch-code.sh"]
    (tmp_path / "fake").write_text('#!/bin/bash\npwd\n')
    (tmp_path / "fake").chmod(0o755)
    (tmp_path / "home/proj").mkdir(parents=True)
    proc = subprocess.run(["bash", str(tmp_path / "local/branch-code.sh")], capture_output=True,
                          text=True, env={**os.environ, "HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "home/proj/logs/branch-code.0.log"
    assert log.read_text().strip() == str(tmp_path / "home/proj")


def test_run_starts_every_party_and_merges_the_listed_ones(tmp_path, monkeypatch, capsys):
    """Before, a party left out of merge.branches was rendered but never run. `repo` with
    `~/` is the working folder of every process."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home/proj").mkdir(parents=True)
    monkeypatch.setattr(jobs, "_moesaic", lambda: [
        sys.executable, "-c", "import os, sys; print(os.getcwd(), *sys.argv[1:3])"])
    m = manifest.load(EXAMPLE, ["repo=~/proj", "merge.branches=('code',)",
                                "parties.code.resources.processes=1",
                                "parties.math.resources.processes=1"])
    assert jobs.run_local(m, log_dir=tmp_path / "logs", poll_seconds=0.05) == 0
    for name in ("code", "math"):
        cwd, *args = (tmp_path / f"logs/branch-{name}.0.log").read_text().split()
        assert cwd == str(tmp_path / "home/proj") and args == ["branch", "--config"]
    assert "start merge of code\n" in capsys.readouterr().out
    run_all = _render(tmp_path, "local", "merge.branches=('code',)")["run_all.sh"]
    assert "pids[code]=$!" in run_all and "pids[math]=$!" in run_all


@pytest.mark.parametrize("argv, message", [
    (["render", "--out", "OUT", "--log-dir", "x"], "render: --log-dir is a flag of `launch "
                                                   "run`, `launch render` would ignore it"),
    (["render", "--out", "OUT", "--parallel", "2"], "render: --parallel is a flag of `launch "
                                                    "run`"),
    (["run", "--out", "OUT"], "run: --out is a flag of `launch render`"),
])
def test_launch_refuses_the_flags_of_the_other_action(tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(["launch", argv[0], EXAMPLE, "--target", "local", *argv[1:]]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_launch_parallel_is_zero_for_automatic_or_a_count(capsys):
    help_text = " ".join(cli.command_parser("launch").format_help().split())
    assert "--parallel PARALLEL run: branch jobs at once (default 0: automatic" in help_text
    with pytest.raises(SystemExit):
        cli.main(["launch", "run", EXAMPLE, "--target", "local", "--parallel", "-1"])
    assert "argument --parallel: must be at least 0, got -1" in capsys.readouterr().err


def test_run_expands_a_home_relative_log_dir_flag(monkeypatch):
    """`--log-dir=~/lg` reaches no shell that would expand it; before, it made `./~/lg`."""
    seen = []
    monkeypatch.setattr(jobs, "run_local", lambda m, log_dir, parallel: seen.append(log_dir))
    assert cli.main(["launch", "run", EXAMPLE, "--target", "local", "--log-dir=~/lg"]) == 0
    assert seen == [os.path.expanduser("~/lg")] and not seen[0].startswith("~")


def test_tpu_vm_render_says_where_a_job_without_repo_runs(tmp_path, capsys):
    argv = ["launch", "render", EXAMPLE, "--target", "tpu-vm", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "repo is empty, so each TPU worker runs its job in its home directory" \
        in capsys.readouterr().err
    assert cli.main([*argv, "--config.repo=/srv/moesaic"]) == 0
    assert "repo is empty" not in capsys.readouterr().err


def test_each_party_gets_its_own_coordinator_port(tmp_path):
    """SLURM jobs of two parties may share a first node, as local ones share loopback."""
    slurm, local = _render(tmp_path, "slurm"), _render(tmp_path, "local")
    for index, name in enumerate(("code", "math")):
        port = 12355 + index
        assert f'| head -n 1):{port}"\n' in slurm[f"branch-{name}.sbatch"]
        assert f"--coordinator 127.0.0.1:{port} " in local[f"branch-{name}.sh"]

