"""The extraction audit on a private branch against a non-private one (bench/dp_audit.py at its
smallest setting): trained identically on a party's documents, the non-private model
reproduces them, the private one (a stated epsilon) does not."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from moesaic.branch_train import dp
from tests.support.processes import ROOT

STEPS, NOISE = 60, 8.0  # epsilon 4.56 (RDP) at delta 1e-5


def _bench():
    spec = importlib.util.spec_from_file_location("dp_audit_bench", ROOT / "bench" / "dp_audit.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    return bench


def test_a_private_branch_is_extracted_far_less_than_the_same_branch_without_privacy(capsys):
    bench = _bench()
    plain, private = bench.compare(steps=STEPS, noises=(NOISE,))
    assert plain.epsilon is None and plain.exact_rate >= 0.75  # memorised
    assert plain.loose_rate >= plain.exact_rate
    assert private.exact_rate == 0.0 and private.loose_rate <= 0.25
    assert private.final_loss > plain.final_loss + 1.0
    assert private.epsilon == pytest.approx(dp.epsilon(NOISE, 4, 4, STEPS, 1e-5))
    assert private.epsilon_pld < private.epsilon < 10
    assert bench.main(["--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err

