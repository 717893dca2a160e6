"""PEFT LoRA adapter folders <-> moesaic low-rank tensors (`moesaic.model.lora`).

A PEFT adapter of an Olmo2ForCausalLM (the Hugging Face form `moesaic import-hf` reads) is a
folder with adapter_config.json and adapter_model.safetensors holding, per adapted layer and
projection,

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight  (B: (out, r))

and PEFT computes y = x W^T + s (x A^T) B^T with s = lora_alpha / r (lora_alpha / sqrt(r)
with use_rslora). moesaic's low-rank expert computes y = x W + s' (x A') B' with A' (in, r),
B' (r, out), s' = alpha' / r, so A' = A^T, B' = B^T and alpha' = lora_alpha (lora_alpha *
sqrt(r) with use_rslora): the same function. The head axes of q, k, v and o are flattened in
the order both use (head, then dimension within the head). A layer the adapter leaves out
(layers_to_transform) gets A' = B' = 0: no update there, as in PEFT.

Everything that would change what the adapted model computes and that a low-rank expert
cannot hold is refused by name (`read_adapter`): DoRA, LoRA biases, modules_to_save, per-module
ranks or alphas, initialisations that change the base weights (PiSSA, OLoRA, LoftQ, CorDA),
projections moesaic does not adapt (embeddings, lm_head), another architecture, tensors whose
shapes do not fit the base, a rank above a projection's. Reading and writing need numpy and
safetensors only: no torch, no peft.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import ml_dtypes
import numpy as np
from safetensors import safe_open

from moesaic.model import lora
from moesaic.model.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
TARGET_OF = {module.rsplit(".", 1)[1]: t for t, module in MODULES.items()}  # q_proj -> q
TARGET_OF_MODULE = {module: t for t, module in MODULES.items()}  # self_attn.q_proj -> q
PREFIX = "base_model.model.model.layers."
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
ARCHITECTURE = {"base_model_class": "Olmo2ForCausalLM",
                "parent_library": "transformers.models.olmo2.modeling_olmo2"}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

# adapter_config.json keys that change the adapted model when set: each must be off
MUST_BE_OFF = {
    "use_dora": "DoRA rescales each adapted weight's columns; a low-rank expert adds A B only",
    "lora_bias": "a bias on lora_B; a low-rank expert has none",
    "fan_in_fan_out": "transposed (Conv1D) weights; OLMo-2's projections are nn.Linear",
    "modules_to_save": "whole trained copies of modules; a low-rank expert holds A and B only",
    "trainable_token_indices": "trained embedding rows; a low-rank expert holds A and B only",
    "target_parameters": "LoRA on raw parameters; only nn.Linear projections are read",
    "layer_replication": "a model with repeated layers; the base's layers are used as they are",
    "rank_pattern": "per-module ranks; one rank for every projection",
    "alpha_pattern": "per-module alphas; one alpha for every projection",
    "use_qalora": "QA-LoRA pools the input; a low-rank expert does not",
    "alora_invocation_tokens": "activated LoRA applies after given tokens only",
    "arrow_config": "PEFT's routing among several adapters; import one adapter per party "
                    "(moesaic's arrow router routes the merged parties)",
    "megatron_config": "Megatron-parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
}
# keys read here, or without effect on the adapted model's outputs
READ = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "init_lora_weights",
        "auto_mapping", "base_model_name_or_path", "bias")
IGNORED = {
    "task_type": "the head on top (CAUSAL_LM keeps the model's)", "peft_version": "bookkeeping",
    "revision": "bookkeeping", "inference_mode": "training option",
    "lora_dropout": "training only", "exclude_modules": "the tensors say what is adapted",
    "layers_to_transform": "the tensors say which layers are adapted (others get no update)",
    "layers_pattern": "the tensors say which layers are adapted",
    "loftq_config": "LoftQ is refused through init_lora_weights",
    "eva_config": "initialisation of A only", "corda_config": "CorDA is refused through "
    "init_lora_weights", "lora_ga_config": "initialisation only",
    "megatron_core": "module path, used only with megatron_config",
    "qalora_group_size": "used only with use_qalora",
    "ensure_weight_tying": "concerns modules_to_save and embeddings, refused above",
}
# initialisations that leave the base's weights as they are
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A PEFT adapter in moesaic's layout: {blocks/lora/<t>_a: (L, 1, in, r), ..._b: (L, 1,
    r, out)} float32, the rank, moesaic's alpha, the targets (in `lora.TARGETS` order), the
    layers each target adapts, and adapter_config.json as read."""
    tensors: dict[str, np.ndarray]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: dict[str, list[int]]
    config: dict


def _off(value) -> bool:
    return value in (None, False, "none") or value == {} or value == []


def check_config(config: dict, folder: pathlib.Path) -> None:
    """Refuses adapter_config.json values a low-rank expert cannot represent, by name."""
    where = f"{folder / CONFIG_FILE}"
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only LoRA adapters "
                         "('LORA') can be imported")
    mapping = config.get("auto_mapping") or {}
    cls = mapping.get("base_model_class")
    if cls is not None and not str(cls).startswith("Olmo2"):
        raise ValueError(f"{where}: auto_mapping.base_model_class={cls!r}: an adapter of "
                         "another architecture; import-peft reads adapters of "
                         "Olmo2ForCausalLM (a base imported with `moesaic import-hf`)")
    named = config.get("base_model_name_or_path")
    if named and (pathlib.Path(named) / "config.json").is_file():
        model_type = json.loads((pathlib.Path(named) / "config.json").read_text()).get(
            "model_type")
        if model_type != "olmo2":
            raise ValueError(f"{where}: its base {named} has model_type={model_type!r}: an "
                             "adapter of another architecture; import-peft reads adapters "
                             "of OLMo-2 (model_type 'olmo2')")
    for key, why in MUST_BE_OFF.items():
        if not _off(config.get(key)):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported ({why})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r}: the adapter trains biases; a "
                         "low-rank expert has none (only bias='none')")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise ValueError(f"{where}: init_lora_weights={config['init_lora_weights']!r} changes "
                         "the base's weights at initialisation (PiSSA, OLoRA, LoftQ, CorDA): "
                         "the adapter does not apply to the base as imported; save it with "
                         "PEFT's path_initial_model_for_weight_conversion first")
    for key, value in config.items():
        if key not in READ and key not in IGNORED and key not in MUST_BE_OFF and not _off(value):
            raise ValueError(f"{where}: {key}={value!r} is not understood by import-peft; it "
                             "may change the adapted model, so it is refused")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGET_OF]
        if unknown:
            raise ValueError(f"{where}: target_modules {unknown}: the model has no such "
                             f"projection; moesaic adapts OLMo-2's {sorted(TARGET_OF)}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r={r!r}: must be a whole number >= 1")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: lora_alpha={alpha!r}: must be > 0 (moesaic's scale is "
                         "alpha / r; 0 would switch the adapter off)")


def _parse_key(key: str, n_layers: int) -> tuple[int, str, str]:
    """(layer, target, 'A' or 'B') of one adapter tensor, or a ValueError naming it."""
    match = KEY.match(key)
    if match is None:
        raise ValueError(f"tensor {key!r} is not a LoRA weight of an OLMo-2 projection "
                         f"({PREFIX}N.<module>.lora_A/B.weight): an adapter of another "
                         "architecture, or with parts a low-rank expert cannot hold")
    layer, module, part = int(match.group(1)), match.group(2), match.group(3)
    target = TARGET_OF_MODULE.get(module)
    if target is None:
        raise ValueError(f"tensor {key!r} adapts module {module!r}, which the model does not "
                         "have among the projections a low-rank expert adapts "
                         f"({sorted(MODULES.values())})")
    if layer >= n_layers:
        raise ValueError(f"tensor {key!r}: layer {layer}, but the base has {n_layers} layers: "
                         "an adapter of another base")
    return layer, target, part


def read_adapter(folder: str | pathlib.Path, base_cfg: ModelConfig) -> Adapter:
    """The adapter in `folder` as moesaic low-rank tensors of `base_cfg` (a dense OLMo-2 base);
    a ValueError naming the tensor or key for anything that does not fit."""
    folder = pathlib.Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} (a PEFT adapter folder, as "
                                    "PeftModel.save_pretrained writes it)")
    config = json.loads((folder / CONFIG_FILE).read_text())
    check_config(config, folder)
    rank = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        for key in sorted(f.keys()):
            layer, target, part = _parse_key(key, base_cfg.n_layers)
            i, o = lora.widths(base_cfg, target)
            shape = tuple(f.get_slice(key).get_shape())
            want = (rank, i) if part == "A" else (o, rank)
            if len(shape) == 2 and shape[0 if part == "A" else 1] != rank:
                raise ValueError(f"tensor {key!r} has rank {shape[0 if part == 'A' else 1]}, "
                                 f"adapter_config.json says r={rank}")
            if shape != want:
                raise ValueError(f"tensor {key!r} has shape {shape}; on this base ({i} -> {o} "
                                 f"per layer) it needs {want}: an adapter of another base")
            if rank > min(i, o):
                raise ValueError(f"tensor {key!r}: rank {rank} exceeds the rank of the "
                                 f"projection {MODULES[target]} ({i} x {o}): at most {min(i, o)}")
            dtype = f.get_slice(key).get_dtype()
            if dtype not in DTYPES:
                raise ValueError(f"tensor {key!r}: dtype {dtype} is not a floating type "
                                 f"import-peft reads ({sorted(DTYPES)})")
            value = f.get_tensor(key).astype(np.float32)
            if not np.isfinite(value).all():
                raise ValueError(f"tensor {key!r} holds NaN or Inf")
            found.setdefault((target, part), {})[layer] = value
    targets = tuple(t for t in lora.TARGETS if (t, "A") in found or (t, "B") in found)
    if not targets:
        raise ValueError(f"{folder / WEIGHTS_FILE} holds no LoRA tensor")
    tensors, layers = {}, {}
    for t in targets:
        a_layers, b_layers = set(found.get((t, "A"), {})), set(found.get((t, "B"), {}))
        if a_layers != b_layers:
            layer, part = min((n, "B" if n in a_layers else "A") for n in a_layers ^ b_layers)
            raise ValueError(f"tensor {PREFIX}{layer}.{MODULES[t]}.lora_{part}.weight is "
                             f"missing (its lora_{'A' if part == 'B' else 'B'} is there)")
        i, o = lora.widths(base_cfg, t)
        a = np.zeros((base_cfg.n_layers, 1, i, rank), np.float32)
        b = np.zeros((base_cfg.n_layers, 1, rank, o), np.float32)
        for layer in a_layers:
            a[layer, 0] = found[(t, "A")][layer].T
            b[layer, 0] = found[(t, "B")][layer].T
        tensors[lora.tensor_name(t, "a")], tensors[lora.tensor_name(t, "b")] = a, b
        layers[t] = sorted(a_layers)
    return Adapter(tensors, rank, alpha, targets, layers, config)


def write_adapter(folder: pathlib.Path, tensors: dict[str, np.ndarray], *, rank: int,
                  alpha: float, targets: tuple[str, ...], base_model: str | None) -> dict:
    """adapter_config.json and adapter_model.safetensors of moesaic low-rank tensors (one
    expert: (L, 1, ...)) into `folder` (which exists); returns the config written."""
    from safetensors.numpy import save_file

    out = {}
    for t in targets:
        a, b = tensors[lora.tensor_name(t, "a")], tensors[lora.tensor_name(t, "b")]
        for layer in range(a.shape[0]):
            if not (a[layer].any() or b[layer].any()):
                continue  # a layer the adapter leaves out (read back as zeros)
            key = f"{PREFIX}{layer}.{MODULES[t]}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[layer, 0].T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[layer, 0].T)
    lora_alpha = alpha or rank  # moesaic's 0 means the rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": ARCHITECTURE,
        "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
        "target_modules": [MODULES[t].rsplit(".", 1)[1] for t in targets],
        "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
        "lora_dropout": 0.0, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(out, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config
