"""Checkpoints of sharded arrays on 8 fake devices: written shard by shard and hashed a bounded
slab at a time (no tensor gathered whole), the same bytes and fingerprint as from one device,
and restored onto 4 devices split another way; a job's own checkpoint alike. And tensors
split over two processes, which neither holds whole, written by both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from moesaic.model import checkpoint
from tests.support.processes import ROOT, last_json_line, run_python, xla_flags

CODE = """
import json, pathlib
import jax, numpy as np
from flax import nnx
from moesaic.branch_train.checkpointing import JobCheckpoints, abstract_like, nested
from moesaic.configs.common import DEFAULT_RULES
from moesaic.model import checkpoint, host_pieces
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import make_mesh, state_shardings

root = pathlib.Path({root!r})
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48,
                  n_experts=4, top_k=2)
_, state = nnx.split(checkpoint.abstract_model(cfg))
rng = np.random.default_rng(0)
host = {{n: rng.standard_normal(a.shape).astype(a.dtype)
         for n, a in checkpoint.flatten(state).items()}}

def shardings(mesh):
    return checkpoint.flatten(state_shardings(state, mesh, DEFAULT_RULES))

eight = make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
sharded = {{n: jax.device_put(a, shardings(eight)[n]) for n, a in host.items()}}
w = sharded["blocks/ffn/w_gate"]  # (L, E, D, F) over expert, fsdp and tensor
pieces = list(host_pieces.pieces(w, max_bytes=1000))
out = dict(spread=not w.is_fully_replicated, pieces=len(pieces),
           largest=max(p.nbytes for p in pieces),
           same_bytes=bool(np.array_equal(np.concatenate([p.reshape(-1) for p in pieces]),
                                          host["blocks/ffn/w_gate"].reshape(-1))))
host_pieces.MAX_BYTES = 4096  # every tensor of this model larger than that is hashed in slabs
checkpoint.save(root / "eight", sharded, dict(kind="model", model=cfg.to_dict()))
checkpoint.verify(root / "eight")
stored = checkpoint.load_tensors(root / "eight", host)
out["stored_equal"] = all(np.array_equal(stored[n], host[n]) for n in host)
out["fingerprint_equal"] = (checkpoint.read_meta(root / "eight")["fingerprint"]
                            == checkpoint.fingerprint(host))
out["restored"] = {{}}
for split in (dict(fsdp=4), dict(expert=4), dict(fsdp=2, tensor=2)):
    mesh = make_mesh(dict(data=1, **split), devices=jax.devices()[:4])
    model, _ = checkpoint.load(root / "eight", mesh=mesh, rules=DEFAULT_RULES)
    flat, want = checkpoint.flatten(nnx.state(model)), shardings(mesh)
    out["restored"][str(split)] = all(
        flat[n].sharding == want[n] and np.array_equal(np.asarray(flat[n]), host[n])
        for n in host)
    if split == dict(fsdp=4):  # saved again from this mesh: the same fingerprint
        checkpoint.save(root / "four", flat, dict(kind="model", model=cfg.to_dict()))
        out["resaved_equal"] = (checkpoint.read_meta(root / "four")["fingerprint"]
                                == checkpoint.read_meta(root / "eight")["fingerprint"])

# a job's own checkpoint (trainable tree and optimizer state) written on 8, resumed on 4
names = ["blocks/ffn/w_gate", "blocks/ffn/router", "embed"]
jobs = JobCheckpoints(root / "job", every=1, keep=1)
jobs.save(1, dict(params=nested({{n: sharded[n] for n in names}}),
                  opt={{"mu": sharded["blocks/ffn/w_up"]}}), dict(step=1), force=True)
jobs.close()
four = make_mesh(dict(data=1, expert=2, fsdp=2), devices=jax.devices()[4:])
want = shardings(four)
target = dict(params=nested(abstract_like({{n: host[n] for n in names}},
                                          {{n: want[n] for n in names}})),
              opt={{"mu": abstract_like(host["blocks/ffn/w_up"], want["blocks/ffn/w_up"])}})
jobs = JobCheckpoints(root / "job", every=1, keep=1)
restored, meta = jobs.restore(1, target)
jobs.close()
params = checkpoint.flatten(restored["params"])
out["job_restored"] = meta == dict(step=1) and all(
    params[n].sharding == want[n] and np.array_equal(np.asarray(params[n]), host[n])
    for n in names) and np.array_equal(np.asarray(restored["opt"]["mu"]), host["blocks/ffn/w_up"])
print(json.dumps(out))
"""


def test_sharded_checkpoints_write_per_shard_and_restore_onto_another_mesh(tmp_path):
    out = last_json_line(run_python(CODE.format(root=str(tmp_path)), devices=8).stdout)
    assert out["spread"] and out["pieces"] > 1 and out["largest"] <= 1000, out
    assert out["same_bytes"] and out["stored_equal"] and out["fingerprint_equal"], out
    assert out["restored"] == {"{'fsdp': 4}": True, "{'expert': 4}": True,
                               "{'fsdp': 2, 'tensor': 2}": True}, out
    assert out["resaved_equal"] and out["job_restored"], out


TWO_PROCESSES = """
import json, pathlib
import jax, numpy as np
jax.distributed.initialize(coordinator_address={address!r}, num_processes=2, process_id={rank})
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from moesaic.model import checkpoint, host_pieces

rng = np.random.default_rng(0)
host = {{"blocks/ffn/w_gate": rng.standard_normal((2, 3, 8, 6)).astype(np.float32),
         "embed": rng.standard_normal((16, 8)).astype(np.float32)}}
mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))  # one device in each process
specs = {{"blocks/ffn/w_gate": P(None, None, "fsdp"), "embed": P("fsdp")}}
sharded = {{n: jax.make_array_from_callback(a.shape, NamedSharding(mesh, specs[n]),
                                           lambda index, a=a: a[index]) for n, a in host.items()}}
assert not any(a.is_fully_addressable for a in sharded.values())
host_pieces.MAX_BYTES = 256  # slabs of 64 floats: every tensor is hashed in several
checkpoint.save(pathlib.Path({root!r}) / "two", sharded, dict(kind="model"))
print(json.dumps(dict(fingerprint=checkpoint.fingerprint(host))))
"""


def test_two_processes_write_their_own_shards_and_agree_on_the_fingerprint(tmp_path):
    """Each tensor split over two processes (one device each): neither holds a whole tensor,
    the checkpoint holds the host copy's values and fingerprint, and it verifies."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(
        [sys.executable, "-c", TWO_PROCESSES.format(address=address, rank=rank,
                                                     root=str(tmp_path))],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
        outs.append(last_json_line(out))
    meta = checkpoint.read_meta(tmp_path / "two")
    assert outs[0] == outs[1] == {"fingerprint": meta["fingerprint"]}
    checkpoint.verify(tmp_path / "two")
    stored = checkpoint.load_tensors(tmp_path / "two", ["blocks/ffn/w_gate", "embed"])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(stored["blocks/ffn/w_gate"],
                                  rng.standard_normal((2, 3, 8, 6)).astype(np.float32))
    np.testing.assert_array_equal(stored["embed"],
                                  rng.standard_normal((16, 8)).astype(np.float32))
