"""PEFT interop: a LoRA adapter made with transformers + peft on a tiny OLMo-2 is imported as a
low-rank branch artifact the merge accepts, whose adapted model (a one-hot router on its slot)
gives PEFT's logits; export-peft gives the adapter's tensors back; adapters that do not fit
are refused naming the tensor or key. Nothing downloads; skipped without the `hf` extra."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moesaic.cli.main import main  # noqa: E402
from moesaic.model import checkpoint, moe  # noqa: E402
from tests.support.training import make_data  # noqa: E402

HF = dict(vocab_size=264, eos_token_id=256, pad_token_id=257, hidden_size=32,
          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.random.default_rng(3).integers(0, 256, size=(2, 10)).astype(np.int64)
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _fill(module, seed: int, only: str = "") -> None:
    """Random values in every parameter whose name holds `only` (norms around 1), so that a
    layout mistake shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only in name:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1.0 + 0.3 * noise if p.ndim == 1 else 0.3 * noise)


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    hf_model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**HF))
    _fill(hf_model, 0)
    hf_model.eval().save_pretrained(root / "hf")
    assert main(["import-hf", str(root / "hf"), "--out", str(root / "base"),
                 "--tokenizer", "bytes"]) == 0
    adapted = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=6,
                                                            target_modules=MODULES))
    _fill(adapted, 1, only="lora_")  # lora_B starts at zero: make it count
    adapted.save_pretrained(root / "adapter")
    adapted.eval()
    with adapted.disable_adapter():  # the base alone: the adapter must change the logits
        base_logits = _logits(adapted)
    data = make_data(root / "data")
    assert main(["import-peft", str(root / "adapter"), "--base", str(root / "base"),
                 "--source", "code", "--data", str(data), "--out", str(root / "artifact"),
                 "--seq-len", "16", "--stats-sequences", "16"]) == 0
    return {"root": root, "base": root / "base", "adapter": root / "adapter",
            "artifact": root / "artifact", "data": data, "peft_logits": _logits(adapted),
            "base_logits": base_logits}


def test_merged_party_computes_what_peft_computes(world, monkeypatch):
    meta = checkpoint.read_meta(world["artifact"])
    assert meta["kind"] == "branch" and meta["source"] == "code"
    assert (meta["model"]["lora_rank"], meta["model"]["lora_alpha"]) == (4, 6.0)
    assert meta["stats_tokens"] > 0 and meta["peft"]["router_init"] == "contrast"
    counts = checkpoint.load_tensors(world["artifact"], ["ngram/bigram", "ngram/context"])
    assert counts["ngram/bigram"].sum() == counts["ngram/context"].sum() > 0  # the party gate's
    merged = world["root"] / "merged"
    assert main(["merge", "--base", str(world["base"]), "--branch", str(world["artifact"]),
                 "--router", "learned-rows", "--out", str(merged)]) == 0
    model, _ = checkpoint.load(merged)
    assert (model.cfg.n_experts, model.cfg.lora_experts) == (2, 1)
    original = moe.route

    def one_hot(x_td, router_ed, bias_e, top_k, norm, gate_tp=None):  # all on party slot 1
        r = original(x_td, router_ed, bias_e, top_k, norm, gate_tp)
        t = x_td.shape[0]
        return moe.Routing(jnp.zeros((t, top_k)).at[:, 0].set(1.0),
                           jnp.ones((t, top_k), jnp.int32), r.probs_te, r.logits_te)

    monkeypatch.setattr(moe, "route", one_hot)
    graphdef, state = nnx.split(model)
    got = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.asarray(TOKENS, jnp.int32))[0])(state)
    want = world["peft_logits"]
    assert np.abs(want).max() > 1.0 and np.abs(want - world["base_logits"]).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_export_gives_the_adapter_back(world):
    out = world["root"] / "exported"
    assert main(["export-peft", str(world["artifact"]), "--out", str(out)]) == 0
    original = load_file(str(world["adapter"] / "adapter_model.safetensors"))
    back = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(back) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4, 6, sorted(MODULES))
    hf_model = transformers.Olmo2ForCausalLM.from_pretrained(world["root"] / "hf")
    reloaded = peft.PeftModel.from_pretrained(hf_model, out).eval()
    np.testing.assert_allclose(_logits(reloaded), world["peft_logits"], atol=1e-5, rtol=0)


def _bad_adapter(world, tmp_path, *, tensors=None, config=None):
    """The good adapter with tensors and config entries changed (None removes one)."""
    folder = tmp_path / "bad"
    shutil.copytree(world["adapter"], folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    for key, value in (tensors or {}).items():
        weights.pop(key) if value is None else weights.__setitem__(key, value)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


Z = np.zeros
GPT2_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
FC1_KEY = "base_model.model.model.layers.0.mlp.fc1.lora_A.weight"


@pytest.mark.parametrize("tensors,config,named", [
    ({A_KEY: Z((4, 48), np.float32)}, None, A_KEY),  # another base: hidden size 48
    ({A_KEY.replace("layers.0", "layers.5"): Z((4, 32), np.float32)}, None, "layer 5"),
    (None, {"auto_mapping": {"base_model_class": "LlamaForCausalLM"}}, "LlamaForCausalLM"),
    ({GPT2_KEY: Z((4, 32), np.float32)}, None, GPT2_KEY),  # another architecture
    ({FC1_KEY: Z((4, 32), np.float32)}, None, FC1_KEY),  # a module OLMo-2 does not have
    (None, {"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({A_KEY.replace("q_proj", "k_proj"): None}, None,
     "layers.0.self_attn.k_proj.lora_A.weight is missing"),  # a B without its A
    (None, {"use_dora": True}, "use_dora"),
    (None, {"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
])
def test_adapters_that_do_not_fit_are_refused_by_name(world, tmp_path, capsys, tensors,
                                                      config, named):
    bad = _bad_adapter(world, tmp_path, tensors=tensors, config=config)
    out = tmp_path / "artifact"
    code = main(["import-peft", str(bad), "--base", str(world["base"]), "--source", "code",
                 "--data", str(world["data"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and named in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_rank_above_the_projections_is_refused_naming_the_tensor(world, tmp_path, capsys):
    """r = 40 on every projection (q: 32 x 32, k and v: 32 x 16, ...)."""
    weights = load_file(str(world["adapter"] / "adapter_model.safetensors"))
    big = {k: Z((40, v.shape[1]) if ".lora_A." in k else (v.shape[0], 40), np.float32)
           for k, v in weights.items()}
    bad = _bad_adapter(world, tmp_path, tensors=big, config={"r": 40})
    code = main(["import-peft", str(bad), "--base", str(world["base"]), "--source", "code",
                 "--data", str(world["data"]), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "rank 40 exceeds" in err and ".lora_" in err, err


def test_rslora_scale_and_left_out_layers(world, tmp_path):
    """use_rslora's lora_alpha / sqrt(r) becomes moesaic's alpha / r; a layer the adapter
    leaves out (layers_to_transform) is zero there and is left out again on export."""
    from moesaic.interop import peft_format

    weights = load_file(str(world["adapter"] / "adapter_model.safetensors"))
    drop = {k: None for k in weights if ".layers.1." in k}
    bad = _bad_adapter(world, tmp_path, tensors=drop,
                       config={"use_rslora": True, "layers_to_transform": [0]})
    cfg = checkpoint.model_config(checkpoint.read_meta(world["base"]))
    adapter = peft_format.read_adapter(bad, cfg)
    assert adapter.alpha == 6 * 2.0 and adapter.layers["q"] == [0]  # 12 / 4 = 6 / sqrt(4)
    a = adapter.tensors["blocks/lora/q_a"]
    assert not a[1].any() and np.array_equal(a[0, 0], weights[A_KEY].T)
    (tmp_path / "out").mkdir()
    peft_format.write_adapter(tmp_path / "out", adapter.tensors, rank=4, alpha=adapter.alpha,
                              targets=adapter.targets, base_model=None)
    assert sorted(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))) == sorted(
        k for k in weights if ".layers.0." in k)
