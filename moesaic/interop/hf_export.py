"""Export: a moesaic model checkpoint -> a folder `transformers.AutoModelForCausalLM` loads as
FlexOlmoForCausalLM (model_type flex_olmo).

Writes config.json, safetensors (one model.safetensors, or shards of at most `max_shard_bytes`
with model.safetensors.index.json), tokenizer.json and tokenizer_config.json, under OUT.partial
renamed to OUT when complete. Tensors are read slice by slice (one layer, one expert) with
`checkpoint.TensorReader`, so memory holds at most one shard. The layout is the inverse of
`hf_import`'s. A dense model (E = 1) is written as a FlexOlmo with one expert and a zero router
(softmax over one expert is 1: the same function); transformers 5 loads it.

FlexOlmoForCausalLM has no router bias: a model whose effective biases (moe.effective_bias) are
non-zero is refused unless `drop_router_bias`, which routes without them.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Callable

import numpy as np
from safetensors.numpy import save_file

from moesaic.interop.byte_tokenizer import check_byte_ids, write_byte_tokenizer
from moesaic.interop.hf_config import hf_config_from_model
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from moesaic.model.names import (
    ATTN_K,
    ATTN_K_NORM,
    ATTN_NORM,
    ATTN_O,
    ATTN_Q,
    ATTN_Q_NORM,
    ATTN_V,
    BIAS,
    EMBED,
    FFN_NORM,
    FINAL_NORM,
    LM_HEAD,
    ROUTER,
    W_DOWN,
    W_GATE,
    W_UP,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*$", re.IGNORECASE)
# GB as transformers' max_shard_size reads it (10^9), GiB as 2^30
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' (5 * 10^9), '4GiB' (4 * 2^30), '500MB', '2048' -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: want a size like 5GB, 4GiB, 500MB or "
                         "123456")
    return int(float(match.group(1)) * _UNITS[unit])


def effective_router_bias(path: str | pathlib.Path, cfg: ModelConfig) -> np.ndarray | None:
    """(L, E) biases as the model applies them (min(b, 0), expert 0 forced to 0), or None."""
    if not (cfg.is_moe and cfg.router_bias):
        return None
    bias = checkpoint.load_tensors(path, [BIAS])[BIAS].astype(np.float32)
    effective = np.minimum(bias, 0.0)
    effective[:, 0] = 0.0
    return effective


class _Plan:
    """The Hugging Face keys in file order, each with its shape, dtype and a reader."""

    def __init__(self, path: pathlib.Path, cfg: ModelConfig):
        self.entries: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]] = []
        stored = checkpoint.tensor_metadata(path)
        opened: dict[str, object] = {}

        def read(name, index=()):
            if name not in opened:
                opened[name] = checkpoint.TensorReader(path, name)
            return opened[name][index]

        d, n, k, hd, f, e_count = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size,
                                   cfg.d_ff, cfg.n_experts)
        dtype = stored[EMBED][1]

        def add(key, shape, fn):
            self.entries.append((key, tuple(shape), dtype, fn))

        add("model.embed_tokens.weight", (cfg.vocab_size, d), lambda: read(EMBED))
        for i in range(cfg.n_layers):
            pre = f"model.layers.{i}."
            for proj, name, heads in (("q", ATTN_Q, n), ("k", ATTN_K, k), ("v", ATTN_V, k)):
                add(f"{pre}self_attn.{proj}_proj.weight", (heads * hd, d),
                    lambda nm=name, h=heads, i=i: read(nm, (i,))
                    .transpose(1, 2, 0).reshape(h * hd, d))
            add(f"{pre}self_attn.o_proj.weight", (d, n * hd),
                lambda i=i: read(ATTN_O, (i,)).transpose(2, 0, 1).reshape(d, n * hd))
            for proj, name, heads in (("q", ATTN_Q_NORM, n), ("k", ATTN_K_NORM, k)):
                add(f"{pre}self_attn.{proj}_norm.weight", (heads * hd,),
                    lambda nm=name, i=i: read(nm, (i,)).reshape(-1))
            add(f"{pre}post_attention_layernorm.weight", (d,), lambda i=i: read(ATTN_NORM, (i,)))
            add(f"{pre}post_feedforward_layernorm.weight", (d,), lambda i=i: read(FFN_NORM, (i,)))
            if cfg.is_moe:
                add(f"{pre}mlp.gate.weight", (e_count, d), lambda i=i: read(ROUTER, (i,)))
            else:
                add(f"{pre}mlp.gate.weight", (1, d), lambda: np.zeros((1, d), dtype))
            for e in range(e_count):
                for proj, name, shape in (("gate_proj", W_GATE, (f, d)),
                                          ("up_proj", W_UP, (f, d)),
                                          ("down_proj", W_DOWN, (d, f))):
                    add(f"{pre}mlp.experts.{e}.{proj}.weight", shape,
                        lambda nm=name, i=i, e=e: read(nm, (i, e)).T)
        add("model.norm.weight", (d,), lambda: read(FINAL_NORM))
        add("lm_head.weight", (cfg.vocab_size, d), lambda: read(LM_HEAD).T)

    def shards(self, max_bytes: int) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype, _) in enumerate(self.entries):
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if groups[-1] and size + nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        return groups


def _tokenizer_source(cfg: ModelConfig) -> pathlib.Path | None:
    """The tokenizer.json to copy (None: the byte tokenizer, written), checked."""
    if cfg.tokenizer in ("", "bytes"):
        check_byte_ids(cfg.vocab_size, cfg.eos_id, cfg.pad_id)
        return None
    source = pathlib.Path(cfg.tokenizer)
    source = source / "tokenizer.json" if source.is_dir() else source
    if not source.is_file():
        raise FileNotFoundError(f"model.tokenizer={cfg.tokenizer!r} does not exist; the "
                                "export needs the tokenizer.json the model was trained with")
    return source


def _write_tokenizer(cfg: ModelConfig, source: pathlib.Path | None, out: pathlib.Path,
                     log) -> None:
    """tokenizer.json (copied from `source`, or the byte tokenizer when None) and
    tokenizer_config.json naming the eos and pad tokens."""
    if source is None:
        write_byte_tokenizer(out / "tokenizer.json", vocab_size=cfg.vocab_size,
                             eos_id=cfg.eos_id, pad_id=cfg.pad_id)
        log("export-hf: byte tokenizer -> tokenizer.json (ByteLevel BPE without merges: byte b "
            f"is id b; <|endoftext|>={cfg.eos_id}, <pad>={cfg.pad_id}, reserved ids up to "
            f"{cfg.vocab_size - 1})")
    else:
        shutil.copyfile(source, out / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    vocab = json.loads((out / "tokenizer.json").read_text()).get("added_tokens", [])
    names = {t["id"]: t["content"] for t in vocab}
    for field, token_id in (("eos_token", cfg.eos_id), ("pad_token", cfg.pad_id)):
        if token_id in names:
            tok_cfg[field] = names[token_id]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))


def export_hf(model_path: str | pathlib.Path, out: str | pathlib.Path, *,
              max_shard_bytes: int = 5 * 10**9, drop_router_bias: bool = False,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Writes the FlexOlmoForCausalLM folder; returns its config.json dict."""
    model_path, out = pathlib.Path(model_path).resolve(), pathlib.Path(out).resolve()
    meta = checkpoint.read_meta(model_path)
    cfg = checkpoint.model_config(meta)
    if out == model_path:
        raise ValueError(f"--out {out} is the model being exported; write elsewhere")
    try:
        checkpoint.output_path(out, overwrite)
    except FileExistsError:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite"
                              ) from None
    if cfg.lora_experts:
        raise ValueError(f"{model_path}: {cfg.lora_experts} low-rank experts (blocks/lora/...); "
                         "FlexOlmoForCausalLM holds only full FFN experts (docs/low-rank.md)")
    if cfg.expert_split > 1:
        raise ValueError(f"{model_path}: model.expert_split={cfg.expert_split} (fine-grained "
                         "experts, router weights scaled by it); FlexOlmoForCausalLM has no such "
                         "scale (docs/low-rank.md)")
    if cfg.gate_parties:
        raise ValueError(f"{model_path}: a party gate over {cfg.gate_parties} parties "
                         "(merge --calibrate); FlexOlmoForCausalLM has only a linear router "
                         "(export the merge made without --calibrate; docs/calibration.md)")
    tokenizer = _tokenizer_source(cfg)  # a missing or unusable one is refused before any weight
    if cfg.is_moe and cfg.router_input != "token":
        raise ValueError(f"{model_path}: model.router_input={cfg.router_input!r}; "
                         "FlexOlmoForCausalLM routes each token on its own hidden state "
                         "('token'), so this model's routing cannot be exported")
    bias = effective_router_bias(model_path, cfg)
    if bias is not None and np.any(bias != 0):
        layers = sorted({int(i) for i in np.nonzero(bias)[0]})
        detail = (f"non-zero router bias in layers {layers} (largest |b| "
                  f"{float(np.abs(bias).max()):.4g}, per expert {np.abs(bias).max(0).round(4)})")
        if not drop_router_bias:
            raise ValueError(f"{model_path}: {detail}. FlexOlmoForCausalLM has no router bias, "
                             "so the exported model would route differently. Pass "
                             "--drop-router-bias to export without it.")
        log(f"export-hf: dropping {detail}. The exported router scores softmax(W x) instead of "
            "softmax(W x + b): experts with a negative bias are chosen more often and get larger "
            "weights than in moesaic; logits differ wherever that changes the mix.")
    plan = _Plan(model_path, cfg)
    hf_meta = meta.get("hf", {}).get("config", {})
    config = hf_config_from_model(
        cfg, dtype=str(plan.entries[0][2]), bos_token_id=hf_meta.get("bos_token_id"),
        max_position_embeddings=hf_meta.get("max_position_embeddings", 4096))
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        total, groups = _write_folder(partial, plan, config, cfg, tokenizer,
                                     max_shard_bytes, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        raise
    checkpoint.commit(partial, out)  # an existing OUT is replaced whole, never left half deleted
    log(f"export-hf: wrote {out}: FlexOlmoForCausalLM E={cfg.n_experts} top_k={cfg.top_k}, "
        f"{len(plan.entries)} tensors, {total / 2**20:.1f} MiB in {len(groups)} file(s)")
    return config


def _write_folder(partial: pathlib.Path, plan: _Plan, config: dict, cfg: ModelConfig,
                  tokenizer: pathlib.Path | None, max_shard_bytes: int,
                  log) -> tuple[int, list]:
    """Safetensors shards (and their index), config.json and the tokenizer files."""
    groups = plan.shards(max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    for file, group in zip(names, groups):
        tensors = {}
        for i in group:
            key, shape, dtype, fn = plan.entries[i]
            array = np.ascontiguousarray(fn().astype(dtype, copy=False))
            if array.shape != shape:
                raise AssertionError(f"{key}: built {array.shape}, planned {shape}")
            tensors[key] = array
            weight_map[key] = file
            total += array.nbytes
        save_file(tensors, str(partial / file), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        (partial / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (partial / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    _write_tokenizer(cfg, tokenizer, partial, log)
    return total, groups
