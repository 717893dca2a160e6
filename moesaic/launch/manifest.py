"""The launch manifest: one Python config file naming the base, the parties and the merge.

A manifest file's `get_config(arg)` returns a ConfigDict (see moesaic/configs/
manifest_example.py) with:

  name       a label for the job names ("moesaic")
  repo       the folder every job `cd`s into first; a leading `~/` is the home directory of
             the host that runs the job. "" = no `cd`: local and SLURM jobs start where the
             script is run (sbatch: the submit folder), TPU VM jobs (over `gcloud ... ssh`)
             in each worker's home directory
  command    how a job host runs moesaic ("moesaic"; e.g. ".venv/bin/moesaic")
  base       the public checkpoint every party starts from
  env        environment variables every job gets
  port       coordinator port of the multi-process jobs (a party's: port + its index)
  log_dir    where rendered jobs write their logs ("logs"; absolute or relative, no `~`)
  parties    one ConfigDict per party, keyed by its name:
    config     config file[:arg] of its branch job, e.g. moesaic/configs/tiny.py:source=code
    source     its source name (becomes config.branch.source; "" keeps the config's)
    data       its prepared data folder on its own cluster ("" = the branch job's default)
    workdir    its branch job's workdir on its own cluster
    overrides  config overrides, ["train.steps=500", ...]
    base       its path of the base ("" = the manifest's base)
    artifact   where the merge reads its artifact ("" = WORKDIR/artifact)
    env        extra environment variables
    extra_args more `moesaic branch` arguments
    resources  nodes, tasks_per_node, gpus_per_node, cpus_per_task, time, partition,
               account (SLURM); tpu_name, tpu_zone, tpu_project (TPU VM);
               processes (local; 0 = nodes * tasks_per_node)
  merge      router, top_k, out, branches (party names in expert order; () = all, by name),
             extra_args, env, resources (as a party's). Every party's branch job runs; the
             merge waits for all of them and fuses the ones `branches` names.

`--config.parties.code.resources.nodes=4` style overrides apply to a manifest as to a config.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from moesaic.configs import loading

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Resources:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    time: str = ""
    partition: str = ""
    account: str = ""
    tpu_name: str = ""
    tpu_zone: str = ""
    tpu_project: str = ""
    processes: int = 0  # local processes; 0 = nodes * tasks_per_node

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def local_processes(self) -> int:
        return self.processes or self.tasks


@dataclasses.dataclass(frozen=True)
class Party:
    name: str
    config: str
    source: str
    data: str
    workdir: str
    overrides: tuple[str, ...]
    base: str
    artifact: str
    env: dict[str, str]
    extra_args: tuple[str, ...]
    resources: Resources


@dataclasses.dataclass(frozen=True)
class Merge:
    router: str
    top_k: int
    out: str
    branches: tuple[str, ...]
    extra_args: tuple[str, ...]
    env: dict[str, str]
    resources: Resources


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    repo: str
    command: str
    base: str
    env: dict[str, str]
    port: int
    log_dir: str
    parties: tuple[Party, ...]
    merge: Merge
    spec: str  # the manifest file[:arg] it was loaded from

    def party(self, name: str) -> Party:
        for party in self.parties:
            if party.name == name:
                return party
        raise KeyError(f"manifest has no party {name!r}; parties: {self.party_names}")

    @property
    def party_names(self) -> list[str]:
        return [p.name for p in self.parties]

    def merge_parties(self) -> list[Party]:
        """The parties whose branches the merge fuses, in expert order."""
        return [self.party(n) for n in self.merge.branches]

    # ---- the commands every target runs ---------------------------------------------

    def branch_args(self, party: Party) -> list[str]:
        """`moesaic branch ...` arguments (after the command) of one party, without the
        multi-process flags."""
        args = ["branch", "--config", party.config, "--base", party.base,
                "--workdir", party.workdir]
        if party.data:
            args += ["--data", party.data]
        if party.source:
            args.append(f"--config.branch.source={party.source}")
        args += [f"--config.{o}" for o in party.overrides]
        return [*args, "--no-progress", *party.extra_args]

    def merge_args(self) -> list[str]:
        args = ["merge", "--base", self.base]
        for party in self.merge_parties():
            args += ["--branch", party.artifact]
        args += ["--router", self.merge.router, "--top-k", str(self.merge.top_k),
                 "--out", self.merge.out]
        return [*args, *self.merge.extra_args]


def distributed_args(processes: int, coordinator: str, process_id: int | str) -> list[str]:
    """The explicit jax.distributed flags of `moesaic branch`; none for one process."""
    if processes <= 1:
        return []
    return ["--coordinator", coordinator, "--num-processes", str(processes),
            "--process-id", str(process_id)]


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Manifest:
    """Loads and checks a manifest file (`path.py[:arg]`, plus `a.b=v` overrides)."""
    config = loading.resolve(spec, list(overrides))
    return from_config(config, spec)


def _where(where: str, what: str) -> str:
    return f"manifest {where}: {what}"


_PLAIN_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")


def _log_dir(config) -> str:
    """A plain path: it is written into #SBATCH lines and double-quoted shell words, where
    neither sbatch nor the shell expands `~`."""
    log_dir = str(config.get("log_dir", "logs") or "logs")
    if "~" in log_dir:
        raise ValueError(_where("log_dir", f"{log_dir!r}: `~` is not expanded in #SBATCH "
                                           "lines or quoted shell words; give an absolute "
                                           "or relative path"))
    if not _PLAIN_PATH.match(log_dir):
        raise ValueError(_where("log_dir", f"{log_dir!r}: letters, digits and / . _ - only "
                                           "(no spaces or shell characters)"))
    return log_dir


def _repo(config) -> str:
    """"" or a folder; `~` only as a leading `~/` (or alone), the job host's home."""
    repo = str(config.get("repo", "") or "")
    if repo.startswith("~") and repo != "~" and not repo.startswith("~/"):
        raise ValueError(_where("repo", f"{repo!r}: only a leading `~/` (this user's home "
                                        "on the job's host) is expanded; write the path "
                                        "out"))
    return repo


def _strings(section, key: str, where: str) -> tuple[str, ...]:
    """A list of strings (a lone string would be split into its letters by tuple())."""
    value = section.get(key, ()) or ()
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(_where(f"{where}.{key}", f"{value!r} must be a list of strings, "
                                                  f"e.g. ({value!r},)"))
    return tuple(value)


def _env(value, where: str) -> dict[str, str]:
    env = {str(k): str(v) for k, v in dict(value or {}).items()}
    bad = [k for k in env if not _ENV_NAME.match(k)]
    if bad:
        raise ValueError(_where(where, f"environment variable names {bad} are not valid "
                                       "shell names"))
    return env


def _resources(value, where: str) -> Resources:
    given = dict(value or {})
    known = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(_where(where, f"unknown resources {unknown}; known: {sorted(known)}"))
    resources = Resources(**given)
    for field in ("nodes", "tasks_per_node"):
        if int(getattr(resources, field)) < 1:
            raise ValueError(_where(where, f"resources.{field} must be at least 1"))
    for field in ("gpus_per_node", "cpus_per_task", "processes"):
        if int(getattr(resources, field)) < 0:
            raise ValueError(_where(where, f"resources.{field} must not be negative"))
    return resources


def _require(section, field: str, where: str) -> str:
    value = str(section.get(field, "") or "")
    if not value:
        raise ValueError(_where(where, f"{field} is required"))
    return value


def from_config(config: ml_collections.ConfigDict, spec: str = "") -> Manifest:
    base = _require(config, "base", "base")
    env = _env(config.get("env"), "env")
    log_dir = _log_dir(config)
    repo = _repo(config)
    parties = []
    for name, section in dict(config.get("parties") or {}).items():
        where = f"parties.{name}"
        if not _NAME.match(name):
            raise ValueError(_where(where, "a party name must be letters, digits, '_', '-' "
                                           "or '.' (it names files and jobs)"))
        workdir = _require(section, "workdir", where)
        parties.append(Party(
            name=name, config=_require(section, "config", where),
            source=str(section.get("source", "") or ""), data=str(section.get("data", "") or ""),
            workdir=workdir, overrides=_strings(section, "overrides", where),
            base=str(section.get("base", "") or base),
            artifact=str(section.get("artifact", "") or f"{workdir.rstrip('/')}/artifact"),
            env=_env(section.get("env"), where),
            extra_args=_strings(section, "extra_args", where),
            resources=_resources(section.get("resources"), where)))
    if not parties:
        raise ValueError(_where("parties", "names no party; add parties.NAME = ConfigDict(...)"))
    merge = config.get("merge")
    if merge is None:
        raise ValueError(_where("merge", "is required (router, top_k, out)"))
    names = [p.name for p in parties]
    branches = _strings(merge, "branches", "merge") or tuple(names)
    unknown = sorted(set(branches) - set(names))
    if unknown or len(set(branches)) != len(branches):
        raise ValueError(_where("merge.branches", f"{list(branches)} must name distinct "
                                                  f"parties among {names}"))
    top_k = int(merge.get("top_k", 1))
    if top_k < 1:  # the upper bound is the base's experts plus the branches: `merge` checks it
        raise ValueError(_where("merge.top_k", f"{top_k} must be at least 1"))
    merge_spec = Merge(router=_require(merge, "router", "merge"), top_k=top_k,
                       out=_require(merge, "out", "merge"), branches=branches,
                       extra_args=_strings(merge, "extra_args", "merge"),
                       env=_env(merge.get("env"), "merge"),
                       resources=_resources(merge.get("resources"), "merge"))
    return Manifest(name=str(config.get("name", "moesaic") or "moesaic"),
                    repo=repo,
                    command=str(config.get("command", "moesaic") or "moesaic"), base=base,
                    env=env, port=int(config.get("port", 12355)),
                    log_dir=log_dir,
                    parties=tuple(parties), merge=merge_spec, spec=spec)
