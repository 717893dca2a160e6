"""Walks the demo's stages in order. A stage whose output is a complete checkpoint (or a file)
is skipped, so a re-run resumes where the last one stopped. One progress bar over the stages;
each stage may show its own."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from moesaic.model import checkpoint


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # what the progress lines call it: "branch/code"
    output: pathlib.Path  # a checkpoint folder or a file; the stage is done once it exists
    run: Callable[[], object]  # writes `output`


def is_done(stage: Stage) -> bool:
    return stage.output.is_file() or checkpoint.is_complete(stage.output)


def run_stages(stages: Sequence[Stage]) -> dict[str, float]:
    """Runs each stage not done before, in order; returns the seconds each one that ran took."""
    bar = tqdm(total=len(stages), desc="demo", unit="stage", position=0, dynamic_ncols=True)
    times: dict[str, float] = {}
    for stage in stages:
        bar.set_postfix_str(stage.name)
        if is_done(stage):
            tqdm.write(f"[demo] {stage.name}: done before ({stage.output})")
        else:
            tqdm.write(f"[demo] {stage.name} ...")
            start = time.perf_counter()
            stage.run()
            times[stage.name] = time.perf_counter() - start
            tqdm.write(f"[demo] {stage.name}: {times[stage.name]:.0f} s")
        bar.update(1)
    bar.close()
    return times


def write_record(out: pathlib.Path, record: dict) -> None:
    """A stage's JSON output, written whole or not at all (a killed write never reads as a
    finished stage)."""
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, out)
