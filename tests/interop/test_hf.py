"""Hugging Face interop: import (Olmo2, FlexOlmo) and export (FlexOlmo) against transformers.

Every model here is made locally, randomly initialised (nothing downloads). Needs the `hf`
extra (torch, transformers); skipped without it.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesaic.cli.main import main  # noqa: E402
from moesaic.interop.byte_tokenizer import write_byte_tokenizer  # noqa: E402
from moesaic.interop.hf_config import model_fields_from_hf  # noqa: E402
from moesaic.interop.hf_export import export_hf  # noqa: E402
from moesaic.interop.hf_import import import_hf  # noqa: E402
from moesaic.model import checkpoint  # noqa: E402
from moesaic.model.config import ModelConfig  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, eos_token_id=2,
            rms_norm_eps=1e-5)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 12)).astype(np.int32)


def _randomise_torch(model, seed=0):
    """Random values everywhere, norms included (they start at 1), large enough that every
    mistake in a layout shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5) + (
                1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _moesaic_logits(path, tokens=TOKENS) -> np.ndarray:
    model, _ = checkpoint.load(path)
    return np.asarray(model(jnp.asarray(tokens))[0])


def _save_random_moesaic(path, cfg: ModelConfig, seed=0, bias=None) -> dict:
    """A moesaic checkpoint of `cfg` with random values (numpy: no eager JAX init), router
    biases `bias` (default zero). Returns the flat tensors."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, value in checkpoint.flatten(nnx.state(checkpoint.abstract_model(cfg))).items():
        if name.endswith("bias"):
            flat[name] = np.zeros(value.shape, np.float32) if bias is None else np.asarray(
                bias, np.float32)
        elif name.endswith("norm"):
            flat[name] = (1.0 + 0.5 * rng.standard_normal(value.shape)).astype(np.float32)
        else:
            flat[name] = (0.3 * rng.standard_normal(value.shape)).astype(np.float32)
    checkpoint.save(path, flat, {"kind": "merged", "model": cfg.to_dict()})
    return flat


@pytest.mark.parametrize("shard", [False, True])
def test_olmo2_import_matches_transformers_with_gqa(tmp_path, shard):
    hf_model = _randomise_torch(transformers.Olmo2ForCausalLM(
        transformers.Olmo2Config(**TINY, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 5e5})))
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if shard else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == shard
    write_byte_tokenizer(tmp_path / "hf" / "tokenizer.json", vocab_size=264, eos_id=256,
                         pad_id=257)
    meta = import_hf(tmp_path / "hf", tmp_path / "base", log=lambda _: None)
    cfg = checkpoint.model_config(meta)
    assert (cfg.n_experts, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (1, 4, 2, 5e5)
    assert cfg.norm_eps == 1e-5 and meta["kind"] == "public"
    assert cfg.tokenizer == str((tmp_path / "base" / "tokenizer.json").resolve())
    assert (tmp_path / "base" / "tokenizer.json").read_bytes() == (
        tmp_path / "hf" / "tokenizer.json").read_bytes()
    flat = checkpoint.load_tensors(tmp_path / "base", checkpoint.tensor_metadata(tmp_path / "base"))
    assert meta["fingerprint"] == checkpoint.fingerprint(flat)
    logits = _moesaic_logits(tmp_path / "base")
    assert np.abs(logits).max() > 1.0  # a real signal, not near-zero noise
    np.testing.assert_allclose(logits, _hf_logits(hf_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_flexolmo_import_matches_transformers(tmp_path, norm_topk_prob):
    hf_model = _randomise_torch(transformers.FlexOlmoForCausalLM(transformers.FlexOlmoConfig(
        **TINY, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)), seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    meta = import_hf(tmp_path / "hf", tmp_path / "base", tokenizer="bytes", log=lambda _: None)
    cfg = checkpoint.model_config(meta)
    assert (cfg.n_experts, cfg.top_k, cfg.norm_topk_prob, cfg.router_bias) == (
        4, 2, norm_topk_prob, False)
    np.testing.assert_allclose(_moesaic_logits(tmp_path / "base"), _hf_logits(hf_model),
                               atol=1e-4, rtol=0)


def _export_and_load(model_dir, out, **kw):
    export_hf(model_dir, out, log=lambda _: None, **kw)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("n_experts,top_k", [(3, 2), (1, 1)])
def test_export_loads_in_transformers_and_imports_back_identically(tmp_path, n_experts, top_k):
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      n_experts=n_experts, top_k=top_k, router_bias=True, rope_theta=5e5)
    _save_random_moesaic(tmp_path / "merged", cfg)
    hf_model = _export_and_load(tmp_path / "merged", tmp_path / "hf", max_shard_bytes=40_000)
    assert type(hf_model).__name__ == "FlexOlmoForCausalLM"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"]) == (n_experts, top_k)
    assert (config["pad_token_id"], config["eos_token_id"]) == (257, 256)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_allclose(_hf_logits(hf_model), _moesaic_logits(tmp_path / "merged"),
                               atol=1e-4, rtol=0)

    import_hf(tmp_path / "hf", tmp_path / "back", log=lambda _: None)
    merged = tmp_path / "merged"
    original = checkpoint.load_tensors(merged, checkpoint.tensor_metadata(merged))
    back = checkpoint.load_tensors(tmp_path / "back", checkpoint.tensor_metadata(tmp_path / "back"))
    if n_experts > 1:  # the all-zero bias has no place in FlexOlmo; the import has none
        assert not original.pop("blocks/ffn/bias").any()
    assert sorted(back) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)


def test_nonzero_router_bias_refused_unless_dropped(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48,
                      n_experts=3, top_k=2, router_bias=True)
    bias = [[0.0, -0.5, 0.0], [0.3, 0.0, 0.2]]  # layer 1's are inert (clamped to <= 0)
    _save_random_moesaic(tmp_path / "m", cfg, bias=bias)
    code = main(["export-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf")])
    assert code == 2 and "--drop-router-bias" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    hf_model = _export_and_load(tmp_path / "m", tmp_path / "hf", drop_router_bias=True)
    _save_random_moesaic(tmp_path / "m0", cfg, bias=np.zeros((2, 3)))  # same seed: same rest
    np.testing.assert_allclose(_hf_logits(hf_model), _moesaic_logits(tmp_path / "m0"),
                               atol=1e-4, rtol=0)


def test_prefix_mean_routing_is_refused_by_export(tmp_path):
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48,
                      n_experts=3, top_k=2, router_input="prefix_mean")
    _save_random_moesaic(tmp_path / "m", cfg)
    with pytest.raises(ValueError, match="router_input='prefix_mean'"):
        export_hf(tmp_path / "m", tmp_path / "hf", log=lambda _: None)
    assert not (tmp_path / "hf").exists()


def test_inert_positive_bias_exports_without_flag(tmp_path):
    """Biases the model never applies (expert 0's, and positive ones: clamped to 0) pass."""
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=4, d_ff=48, n_experts=2,
                      top_k=1)
    _save_random_moesaic(tmp_path / "m", cfg, bias=[[-1.0, 0.4]])
    export_hf(tmp_path / "m", tmp_path / "hf", log=lambda _: None)
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("changes,field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"qk_layernorm_kind": "per_head"}, "qk_layernorm_kind"),
    ({"model_type": "llama"}, "model_type"),
])
def test_unrepresentable_config_refused_by_name(changes, field):
    hf = transformers.FlexOlmoConfig(**TINY, num_experts=2, num_experts_per_tok=1).to_dict()
    model_fields_from_hf(hf)  # the unchanged config is fine
    with pytest.raises(ValueError, match=field):
        model_fields_from_hf({**hf, **changes})


@pytest.mark.parametrize("model_type,key", [("olmo2", "rms_norm_eps"),
                                            ("flex_olmo", "num_experts_per_tok"),
                                            ("flex_olmo", "num_attention_heads")])
def test_a_config_key_that_changes_the_logits_is_never_guessed(model_type, key):
    """transformers would fill a missing key from its own class default (Olmo2's eps 1e-5,
    FlexOlmo's top-5): the importer refuses instead of taking moesaic's."""
    config = (transformers.Olmo2Config(**TINY) if model_type == "olmo2" else
              transformers.FlexOlmoConfig(**TINY, num_experts=2, num_experts_per_tok=1))
    hf = config.to_dict()
    for gone in ({k: v for k, v in hf.items() if k != key}, {**hf, key: None}):
        with pytest.raises(ValueError, match=f"no value for \\['{key}'\\]"):
            model_fields_from_hf(gone)
    with pytest.raises(ValueError, match="unknown_switch=0"):  # 0 is not "switched off"
        model_fields_from_hf({**hf, "unknown_switch": 0})


def test_export_checks_the_tokenizer_before_writing_and_leaves_nothing(tmp_path):
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=4, d_ff=48,
                      eos_id=3, pad_id=4)  # byte ids a tokenizer.json cannot describe
    _save_random_moesaic(tmp_path / "m", cfg)
    with pytest.raises(ValueError, match="expects eos_id=256"):
        export_hf(tmp_path / "m", tmp_path / "hf", log=lambda _: None)
    with pytest.raises(ValueError, match="is the model being exported"):
        export_hf(tmp_path / "m", tmp_path / "m", overwrite=True, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_import_records_a_tokenizer_path_that_resolves_from_anywhere(tmp_path, monkeypatch):
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY)).save_pretrained(
        tmp_path / "hf")
    write_byte_tokenizer(tmp_path / "tok.json", vocab_size=264, eos_id=256, pad_id=257)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'nope.json': no such tokenizer.json"):
        import_hf("hf", "b", tokenizer="nope.json", log=lambda _: None)
    meta = import_hf("hf", "b", tokenizer="tok.json", log=lambda _: None)
    assert meta["model"]["tokenizer"] == str(tmp_path / "tok.json")
    # the copied tokenizer is inside the checkpoint when it is committed
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tmp_path / "tok.json").read_bytes())
    meta = import_hf("hf", "c", log=lambda _: None)
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    assert meta["model"]["tokenizer"] == str(tmp_path / "c" / "tokenizer.json")


def test_cli_import_names_refused_field(tmp_path, capsys):
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    code = main(["import-hf", str(tmp_path), "--out", str(tmp_path / "b"), "--tokenizer",
                 "bytes"])
    err = capsys.readouterr().err
    assert code == 2 and "moesaic import-hf: error: config.json attention_bias=True" in err
    assert not (tmp_path / "b").exists()


def test_cli_export_errors_go_to_stderr_and_name_the_checkpoint_inside_a_workdir(tmp_path,
                                                                                 capsys):
    from moesaic.model import Decoder

    cfg = ModelConfig(vocab_size=264, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    checkpoint.save_model(tmp_path / "run" / "public", Decoder(cfg, rngs=nnx.Rngs(0)))
    for model, message in ((tmp_path / "nowhere", "does not exist"),
                           (tmp_path / "run", f"did you mean {tmp_path / 'run' / 'public'}?")):
        code = main(["export-hf", str(model), "--out", str(tmp_path / "hf")])
        out = capsys.readouterr()
        assert code == 2 and out.out == "" and message in out.err
    assert not (tmp_path / "hf").exists()


def test_weights_the_config_cannot_lay_out_are_named_before_any_write(tmp_path):
    from safetensors.numpy import load_file, save_file

    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY)).save_pretrained(tmp_path)
    write_byte_tokenizer(tmp_path / "tokenizer.json", vocab_size=264, eos_id=256, pad_id=257)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight: shape "
                                         r"\(16, 32\) cannot be laid out as blocks/attn/k "
                                         r"of \(32, 2, 16\) per layer; config.json"):
        import_hf(tmp_path, tmp_path / "b", log=lambda _: None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]  # an Olmo2 tensor, named as Olmo2 does
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) the config implies are not in .*"
                                         r"\['model.layers.1.mlp.up_proj.weight'\]"):
        import_hf(tmp_path, tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="exists; choose another output or pass "
                                              "--overwrite"):
        import_hf(tmp_path, tmp_path / "b", log=lambda _: None)


def test_shard_sizes_read_as_transformers_reads_them():
    from moesaic.interop.hf_export import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30
    assert parse_size("500 mb") == 500 * 10**6 and parse_size("2048") == 2048
    assert parse_size("1.5KiB") == 1536 and parse_size(7) == 7
    for bad in ("5G", "5XB", "GB", "-1GB"):
        with pytest.raises(ValueError, match="want a size like 5GB, 4GiB"):
            parse_size(bad)


def test_byte_tokenizer_json_gives_byte_ids(tmp_path):
    from tokenizers import Tokenizer

    write_byte_tokenizer(tmp_path / "t.json", vocab_size=264, eos_id=256, pad_id=257)
    tok = Tokenizer.from_file(str(tmp_path / "t.json"))
    text = "héllo\n\t ✓ {}"
    assert tok.encode(text).ids == list(text.encode())
    assert tok.token_to_id("<|endoftext|>") == 256 and tok.token_to_id("<pad>") == 257
    assert tok.get_vocab_size() == 264 and tok.decode(list(text.encode())) == text

