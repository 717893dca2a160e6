"""One job per party and one merge job, from one manifest: the scripts rendered for each
target, and the local form run here (`moesaic launch`, moesaic/cli/launch.py, parses the
command line and calls `render` or `run_local`).

`render` writes, per target (every party's branch job runs; the merge waits for all of them
and fuses the parties merge.branches names):
  slurm   branch-NAME.sbatch (nodes, tasks and GPUs per node; `srun` starts one
          `moesaic branch` per task, jax.distributed from SLURM_NODELIST / SLURM_NTASKS /
          SLURM_PROCID), merge.sbatch, and submit_all.sh (sbatch every branch, then the
          merge with --dependency=afterok on all of them)
  tpu-vm  branch-NAME.sh (`gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all
          --command="..."` with the job's environment), merge.sh, run_all.sh
  local   branch-NAME.sh (N processes on loopback, process ids 0..N-1), merge.sh,
          run_all.sh

A party's coordinator port (slurm, local) is PORT + its index among the parties, so two
parties' jobs on one host never collide.

`run_local` executes the local form here: every party's branch job (several at once when the
machine has a core per process for them), then the merge. A failing job stops the run; its
log's tail is printed. The scripts are rendered from string.Template files in
moesaic/launch/templates.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import socket
import string
import subprocess
import sys
import time

from moesaic.launch.manifest import Manifest, Party, Resources, distributed_args

TARGETS = ("slurm", "tpu-vm", "local")
TEMPLATES = pathlib.Path(__file__).parent / "templates"
LOG_TAIL_LINES = 30


# ---- rendering -------------------------------------------------------------------------

def _template(name: str, **values) -> str:
    return string.Template((TEMPLATES / name).read_text()).substitute(values)


def _job_name(manifest: Manifest, what: str) -> str:
    return f"{manifest.name}-{what}"


def _repo_word(repo: str) -> str:
    """The repo as one shell word; a leading `~/` stays unquoted, so the shell running the
    job expands it to the home directory there."""
    if repo == "~" or repo.startswith("~/"):
        rest = repo[2:]
        return "~/" + shlex.quote(rest) if rest else "~"
    return shlex.quote(repo)


def _cd(manifest: Manifest) -> str:
    return f"cd {_repo_word(manifest.repo)}\n" if manifest.repo else ""


def _exports(*envs: dict[str, str]) -> str:
    merged = {k: v for env in envs for k, v in env.items()}
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in merged.items())


def _command(manifest: Manifest, args: list[str]) -> str:
    return " ".join([manifest.command, *(shlex.quote(a) for a in args)])


def _double_quoted(text: str) -> str:
    """`text` as one double-quoted shell word."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def _slurm_directives(resources: Resources) -> str:
    lines = []
    if resources.gpus_per_node:
        lines.append(f"--gpus-per-node={resources.gpus_per_node}")
    for flag, value in (("cpus-per-task", resources.cpus_per_task), ("time", resources.time),
                        ("partition", resources.partition), ("account", resources.account)):
        if value:
            lines.append(f"--{flag}={value}")
    return "".join(f"#SBATCH {line}\n" for line in lines)


def _slurm_branch(manifest: Manifest, party: Party) -> str:
    r = party.resources
    command = _command(manifest, manifest.branch_args(party))
    srun_flags = f"--nodes={r.nodes} --ntasks-per-node={r.tasks_per_node} --kill-on-bad-exit=1"
    if r.gpus_per_node and r.tasks_per_node > 1:
        srun_flags += f" --gpus-per-task={max(1, r.gpus_per_node // r.tasks_per_node)}"
    if r.tasks > 1:
        task = ('exec "$@" --coordinator "$MOESAIC_COORDINATOR" --num-processes '
                '"$SLURM_NTASKS" --process-id "$SLURM_PROCID"')
        srun = f"srun {srun_flags} bash -c '{task}' moesaic-task {command}"
    else:
        srun = f"srun {srun_flags} {command}"
    return _template("slurm_branch.sbatch", job_name=_job_name(manifest, party.name),
                     nodes=r.nodes, tasks_per_node=r.tasks_per_node,
                     directives=_slurm_directives(r), log_dir=manifest.log_dir,
                     party=party.name, manifest=manifest.spec, cd=_cd(manifest),
                     exports=_exports(manifest.env, party.env),
                     port=party_port(manifest, party), srun=srun)


def _slurm_files(manifest: Manifest) -> dict[str, str]:
    files = {f"branch-{p.name}.sbatch": _slurm_branch(manifest, p) for p in manifest.parties}
    files["merge.sbatch"] = _template(
        "slurm_merge.sbatch", job_name=_job_name(manifest, "merge"),
        directives=_slurm_directives(manifest.merge.resources), log_dir=manifest.log_dir,
        branches=", ".join(manifest.merge.branches), manifest=manifest.spec, cd=_cd(manifest),
        exports=_exports(manifest.env, manifest.merge.env),
        command=_command(manifest, manifest.merge_args()))
    submit, variables = [], []
    for i, party in enumerate(manifest.parties):
        var = f"job_{i}"  # by position: 'code-v2' and 'code_v2' must not share a variable
        submit.append(f'{var}=$(sbatch --parsable "$here/branch-{party.name}.sbatch")\n'
                      f"{var}=${{{var}%%;*}}\n"
                      f'echo "branch {party.name}: job ${var}"\n')
        variables.append(f"${var}")
    files["submit_all.sh"] = _template(
        "slurm_submit_all.sh", manifest=manifest.spec, cd=_cd(manifest),
        log_dir=manifest.log_dir, submit_branches="".join(submit),
        dependencies=":".join(variables), dependencies_echo=" ".join(variables))
    return files


def _project_flag(project: str) -> str:
    return f" --project {shlex.quote(project)}" if project else ""


def _tpu_ssh(name: str, zone: str, project: str, worker: str, remote: str) -> str:
    return (f"gcloud compute tpus tpu-vm ssh {shlex.quote(name)} --zone {shlex.quote(zone)}"
            f"{_project_flag(project)} --worker={worker} --command={_double_quoted(remote)}")


def _remote(manifest: Manifest, env: dict[str, str], command: str) -> str:
    """The command a TPU worker runs: cd, environment, the job."""
    parts = [f"cd {_repo_word(manifest.repo)}"] if manifest.repo else []
    parts += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return " && ".join([*parts, command])


def _merge_sh(manifest: Manifest, target: str) -> str:
    merge = manifest.merge
    command = _command(manifest, manifest.merge_args())
    cd, exports = _cd(manifest), _exports(manifest.env, merge.env)
    if target == "tpu-vm" and merge.resources.tpu_name:
        r = merge.resources
        command = _tpu_ssh(r.tpu_name, r.tpu_zone, r.tpu_project, "0",
                           _remote(manifest, {**manifest.env, **merge.env}, command))
        cd, exports = "", ""
    return _template("merge.sh", branches=", ".join(merge.branches), manifest=manifest.spec,
                     cd=cd, exports=exports, log_dir=manifest.log_dir, command=command)


def _run_all(manifest: Manifest) -> str:
    start = "".join(f'"$here/branch-{p.name}.sh" & pids[{shlex.quote(p.name)}]=$!\n'
                    for p in manifest.parties)
    return _template("run_all.sh", manifest=manifest.spec, start_branches=start)


def _tpu_files(manifest: Manifest) -> dict[str, str]:
    files = {}
    for party in manifest.parties:
        r = party.resources
        if not (r.tpu_name and r.tpu_zone):
            raise ValueError(f"party {party.name!r} has no resources.tpu_name / tpu_zone; "
                             "set them in the manifest (or --config.parties."
                             f"{party.name}.resources.tpu_name=...)")
        remote = _remote(manifest, {**manifest.env, **party.env, "MOESAIC_DISTRIBUTED": "auto"},
                         _command(manifest, manifest.branch_args(party)))
        files[f"branch-{party.name}.sh"] = _template(
            "tpu_branch.sh", party=party.name, tpu_name=shlex.quote(r.tpu_name),
            manifest=manifest.spec, log_dir=manifest.log_dir,
            tpu_zone=shlex.quote(r.tpu_zone), project=_project_flag(r.tpu_project),
            remote=_double_quoted(remote), log=f"{manifest.log_dir}/branch-{party.name}.log")
    files["merge.sh"] = _merge_sh(manifest, "tpu-vm")
    files["run_all.sh"] = _run_all(manifest)
    return files


def party_port(manifest: Manifest, party: Party) -> int:
    """The coordinator port of a party's job: manifest.port + its index, so the jobs of two
    parties that land on one host (loopback, or a shared first node) do not collide."""
    return manifest.port + manifest.party_names.index(party.name)


def _local_files(manifest: Manifest) -> dict[str, str]:
    files = {}
    for party in manifest.parties:
        n = party.resources.local_processes
        port = party_port(manifest, party)
        command = _command(manifest, manifest.branch_args(party))
        if n > 1:
            command += (f" --coordinator 127.0.0.1:{port} --num-processes {n}"
                        ' --process-id "$process_id"')
        files[f"branch-{party.name}.sh"] = _template(
            "local_branch.sh", party=party.name, processes=n, port=port,
            manifest=manifest.spec, cd=_cd(manifest), exports=_exports(manifest.env, party.env),
            log_dir=manifest.log_dir, command=command)
    files["merge.sh"] = _merge_sh(manifest, "local")
    files["run_all.sh"] = _run_all(manifest)
    return files


def render(manifest: Manifest, target: str, out: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes the target's scripts into `out` (executable); returns their paths."""
    builders = {"slurm": _slurm_files, "tpu-vm": _tpu_files, "local": _local_files}
    if target not in builders:
        raise ValueError(f"target {target!r}: one of {TARGETS}")
    files = builders[target](manifest)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


# ---- running the local form here ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moesaic() -> list[str]:
    """This interpreter's `moesaic` (the manifest's command is for rendered scripts)."""
    return [sys.executable, "-m", "moesaic.cli.main"]


def _tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclasses.dataclass
class _Job:
    """One party's processes (or the merge's one), started together."""
    name: str
    argvs: list[list[str]]
    logs: list[pathlib.Path]
    env: dict[str, str]
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    started: float = 0.0
    failed: int = 0  # index of the process whose failure poll() saw first

    def start(self, cwd: str | None) -> None:
        self.started = time.perf_counter()
        for argv, log in zip(self.argvs, self.logs):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as handle:
                self.procs.append(subprocess.Popen(argv, stdout=handle,
                                                   stderr=subprocess.STDOUT, cwd=cwd,
                                                   env=self.env))

    def poll(self) -> int | None:
        """None while running; 0 when every process succeeded; else the first failure's
        code (the other processes are then stopped: they would wait on it forever). The
        failing process is recorded first: once stopped, the others exit non-zero too."""
        codes = [p.poll() for p in self.procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            self.failed = failed[0]
            self.stop()
            return codes[self.failed]
        return 0 if all(c == 0 for c in codes) else None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def failure(self, code: int) -> str:
        index = self.failed
        return (f"{self.name} failed (exit code {code}, process {index}); the last "
                f"{LOG_TAIL_LINES} lines of {self.logs[index]}:\n{_tail(self.logs[index])}")


def _branch_job(manifest: Manifest, party: Party, log_dir: pathlib.Path) -> _Job:
    n = party.resources.local_processes
    coordinator = f"127.0.0.1:{_free_port()}"
    argvs = [[*_moesaic(), *manifest.branch_args(party), *distributed_args(n, coordinator, i)]
             for i in range(n)]
    logs = [log_dir / f"branch-{party.name}.{i}.log" for i in range(n)]
    return _Job(f"branch {party.name!r}", argvs, logs,
                {**os.environ, **manifest.env, **party.env})


def run_local(manifest: Manifest, *, log_dir: str | pathlib.Path = "logs",
              parallel: int = 0, poll_seconds: float = 0.5) -> int:
    """Runs every party's branch job here (`parallel` at once; 0: as many as there are cores
    for their processes, at least one), then the merge of merge.branches. Returns 0, or 1
    after the first failure (its log tail printed, the other running jobs stopped, no
    merge)."""
    log_dir = pathlib.Path(log_dir)
    cwd = os.path.expanduser(manifest.repo) if manifest.repo else None
    pending = list(manifest.parties)  # a job's port is picked when it starts
    cores = os.cpu_count() or 1
    running: list[_Job] = []
    try:
        while pending or running:
            busy = sum(len(j.argvs) for j in running)
            while pending and (not running or (
                    len(running) < parallel if parallel
                    else busy + pending[0].resources.local_processes <= cores)):
                job = _branch_job(manifest, pending.pop(0), log_dir)
                print(f"start {job.name}: {len(job.argvs)} process(es), logs "
                      f"{job.logs[0].parent}/", flush=True)
                job.start(cwd)
                running.append(job)
                busy += len(job.argvs)
            time.sleep(poll_seconds)
            for job in list(running):
                code = job.poll()
                if code is None:
                    continue
                running.remove(job)
                if code:
                    print(job.failure(code), file=sys.stderr)
                    return 1
                print(f"done {job.name} in {time.perf_counter() - job.started:.0f} s",
                      flush=True)
    finally:
        for job in running:
            job.stop()
    merge = _Job("merge", [[*_moesaic(), *manifest.merge_args()]], [log_dir / "merge.log"],
                 {**os.environ, **manifest.env, **manifest.merge.env})
    print(f"start merge of {', '.join(manifest.merge.branches)}", flush=True)
    merge.start(cwd)
    while (code := merge.poll()) is None:
        time.sleep(poll_seconds)
    if code:
        print(merge.failure(code), file=sys.stderr)
        return 1
    print(f"merged model: {manifest.merge.out}")
    return 0
