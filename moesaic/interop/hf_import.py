"""Import: a Hugging Face Olmo2ForCausalLM / FlexOlmoForCausalLM folder -> a moesaic checkpoint.

Reads config.json (mapped by `hf_config`), the safetensors (one file or shards with
model.safetensors.index.json) and tokenizer.json. Every moesaic tensor is stacked over layers
(and experts); it is built from its per-layer Hugging Face pieces, written, and dropped before
the next one (`streaming.save_streaming`, which also computes the fingerprint on the way), so
memory holds one layer of one tensor at a time. Every key is checked (missing, or without a place in
moesaic) before anything is written.

Layout (HF nn.Linear weights are (out, in)):
    self_attn.q_proj (H*hd, D)  -> blocks/attn/q (L, D, H, hd)      (k, v alike with K heads)
    self_attn.o_proj (D, H*hd)  -> blocks/attn/o (L, H, hd, D)
    self_attn.q_norm (H*hd,)    -> blocks/attn/q_norm (L, H, hd)    (k_norm alike)
    post_attention_layernorm    -> blocks/attn_norm;  post_feedforward_layernorm -> ffn_norm
    mlp.gate (E, D)             -> blocks/ffn/router (L, E, D)
    mlp.experts.{e}.{gate,up}_proj (F, D) -> blocks/ffn/w_gate, w_up (L, E, D, F)
    mlp.experts.{e}.down_proj (D, F)      -> blocks/ffn/w_down (L, E, F, D)
    (Olmo2: mlp.{gate,up,down}_proj -> expert 0 of E = 1; fused experts.gate_up_proj also read)
    model.embed_tokens (V, D) -> embed;  lm_head (V, D) -> lm_head (D, V);  model.norm -> final_norm
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from moesaic.data.tokenizer import load_tokenizer
from moesaic.interop.hf_config import model_fields_from_hf
from moesaic.model import checkpoint, names, streaming
from moesaic.model.config import ModelConfig

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "F64": np.float64}
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFolder(contextlib.AbstractContextManager):
    """Tensors by Hugging Face key from model.safetensors or the shards an index names; each
    `get` reads one tensor (memory-mapped by safetensors)."""

    def __init__(self, folder: str | pathlib.Path):
        folder = pathlib.Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: folder / f for k, f in json.loads(index.read_text())[
                "weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            self.file_of = None
            single = folder / "model.safetensors"
        else:
            raise FileNotFoundError(f"{folder}: neither model.safetensors nor "
                                    "model.safetensors.index.json")
        self._stack = contextlib.ExitStack()
        self._open: dict[pathlib.Path, object] = {}
        if self.file_of is None:
            handle = self._handle(single)
            self.file_of = {k: single for k in handle.keys()}

    def _handle(self, file: pathlib.Path):
        if file not in self._open:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} named by the index is missing")
            self._open[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
        return self._open[file]

    def __exit__(self, *exc):
        self._stack.close()

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def dtype(self, key: str) -> np.dtype:
        name = self._handle(self.file_of[key]).get_slice(key).get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key}: dtype {name} is not a floating type moesaic reads")
        return np.dtype(SAFETENSORS_DTYPES[name])

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape, read from the header alone."""
        return tuple(self._handle(self.file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        if key not in self.file_of:
            raise KeyError(f"the checkpoint has no tensor {key!r}")
        return self._handle(self.file_of[key]).get_tensor(key)


def _piece_rules(cfg: ModelConfig, reader: SafetensorsFolder
                 ) -> dict[str, tuple[int, Callable[[int, int], tuple[str, np.ndarray]]]]:
    """moesaic name -> (number of leading stacked axes, fn(layer, expert) -> (key, read)):
    `read()` returns the piece in moesaic layout; the key alone reads nothing."""
    d, n, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    f = cfg.d_ff

    def layer(suffix, transform=lambda w: w):
        def fn(i, _):
            key = f"model.layers.{i}.{suffix}"
            return key, lambda: transform(reader.get(key))
        return 1, fn

    fused = "model.layers.0.mlp.experts.gate_up_proj" in reader
    # Olmo2 names its MLP mlp.{proj}; FlexOlmo (one expert included) mlp.experts.{e}.{proj}
    olmo2_mlp = not cfg.is_moe and not any(".mlp.experts." in key for key in reader.keys())

    def expert(proj):
        def fn(i, e):
            if olmo2_mlp:
                key = f"model.layers.{i}.mlp.{proj}.weight"
                return key, lambda: reader.get(key).T
            if fused and proj != "down_proj":
                key = f"model.layers.{i}.mlp.experts.gate_up_proj"
                rows = slice(0, f) if proj == "gate_proj" else slice(f, 2 * f)
                return key, lambda: reader.get(key)[e, rows].T
            if fused:
                key = f"model.layers.{i}.mlp.experts.down_proj"
                return key, lambda: reader.get(key)[e].T
            key = f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
            return key, lambda: reader.get(key).T
        return 2, fn

    def whole(key, transform=lambda w: w):
        return 0, lambda *_: (key, lambda: transform(reader.get(key)))

    return {
        names.EMBED: whole("model.embed_tokens.weight"),
        names.FINAL_NORM: whole("model.norm.weight"),
        names.LM_HEAD: whole("lm_head.weight", lambda w: w.T),
        names.ATTN_Q: layer("self_attn.q_proj.weight",
                            lambda w: w.reshape(n, hd, d).transpose(2, 0, 1)),
        names.ATTN_K: layer("self_attn.k_proj.weight",
                            lambda w: w.reshape(k, hd, d).transpose(2, 0, 1)),
        names.ATTN_V: layer("self_attn.v_proj.weight",
                            lambda w: w.reshape(k, hd, d).transpose(2, 0, 1)),
        names.ATTN_O: layer("self_attn.o_proj.weight",
                            lambda w: w.reshape(d, n, hd).transpose(1, 2, 0)),
        names.ATTN_Q_NORM: layer("self_attn.q_norm.weight", lambda w: w.reshape(n, hd)),
        names.ATTN_K_NORM: layer("self_attn.k_norm.weight", lambda w: w.reshape(k, hd)),
        names.ATTN_NORM: layer("post_attention_layernorm.weight"),
        names.FFN_NORM: layer("post_feedforward_layernorm.weight"),
        names.W_GATE: expert("gate_proj"),
        names.W_UP: expert("up_proj"),
        names.W_DOWN: expert("down_proj"),
        names.ROUTER: layer("mlp.gate.weight"),
    }


class _StackedTensor:
    """One moesaic tensor built from its Hugging Face pieces, one layer block at a time."""

    def __init__(self, name, shape, dtype, n_lead, piece_fn):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.n_lead, self.piece_fn = n_lead, piece_fn

    def keys(self) -> set[str]:
        """The Hugging Face keys this tensor is built from (nothing is read)."""
        return {self.piece_fn(*(index + (0, 0))[:2])[0]
                for index in np.ndindex(*self.shape[:self.n_lead])}

    def _piece(self, layer: int, expert: int) -> np.ndarray:
        key, read = self.piece_fn(layer, expert)
        want = self.shape[self.n_lead:]
        try:
            piece = read()
        except ValueError as err:  # a reshape the config's head counts and sizes cannot do
            raise ValueError(f"{key}: cannot be laid out as {self.name} ({want} per slice): "
                             f"{err}; config.json (hidden_size, num_attention_heads, "
                             "num_key_value_heads, head_dim) and the weights disagree") from None
        if piece.shape != want:
            raise ValueError(f"{key}: in moesaic layout its shape is {piece.shape} but "
                             f"{self.name} needs {want} per slice; config.json and the "
                             "weights disagree")
        return piece.astype(self.dtype, copy=False)

    def layer_blocks(self) -> Iterator[np.ndarray]:
        """Consecutive blocks along axis 0 (what streaming.save_streaming writes): the whole tensor
        for unstacked ones, one layer (all its experts) for stacked ones."""
        if self.n_lead == 0:
            yield self._piece(0, 0)
            return
        for layer in range(self.shape[0]):
            if self.n_lead == 1:
                yield self._piece(layer, 0)[None]
            else:
                yield np.stack([self._piece(layer, e) for e in range(self.shape[1])])[None]


PARAM_DTYPES = ("float32", "bfloat16", "float16")


def _param_dtype(reader: SafetensorsFolder, requested: str | None) -> str:
    if requested:
        if requested not in PARAM_DTYPES:
            raise ValueError(f"--param-dtype {requested!r}: one of {PARAM_DTYPES}")
        return str(np.dtype(ml_dtypes.bfloat16 if requested == "bfloat16" else requested))
    found = {str(reader.dtype(key)) for key in reader.keys()}
    if len(found) != 1:
        raise ValueError(f"the weights mix dtypes {sorted(found)}; pass --param-dtype")
    return found.pop()


def import_hf(folder: str | pathlib.Path, out: str | pathlib.Path, *,
              param_dtype: str | None = None, tokenizer: str | None = None,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Converts `folder` into a moesaic checkpoint at `out`; returns its meta.

    `param_dtype` None keeps the stored dtype. `tokenizer` None copies folder/tokenizer.json
    into `out` and points model.tokenizer at it; otherwise it is used as model.tokenizer."""
    folder, out = pathlib.Path(folder).resolve(), pathlib.Path(out).resolve()  # orbax: absolute
    hf = json.loads((folder / "config.json").read_text())
    fields = model_fields_from_hf(hf)
    try:  # before any work: an existing or reserved output
        checkpoint.output_path(out, overwrite)
    except FileExistsError:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite"
                              ) from None
    if out == folder:
        raise ValueError(f"--out {out} is the folder being imported; write elsewhere")
    if tokenizer is None and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; pass --tokenizer (a "
                                "tokenizer.json path, or 'bytes')")
    if tokenizer not in (None, "bytes"):  # recorded absolute: the checkpoint is read elsewhere
        path = pathlib.Path(tokenizer).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer!r}: no such tokenizer.json")
        load_tokenizer(str(path))  # refuses a file that is not a tokenizer
        tokenizer = str(path)
    with SafetensorsFolder(folder) as reader:
        fields["param_dtype"] = _param_dtype(reader, param_dtype)
        fields["tokenizer"] = tokenizer or str(out.resolve() / "tokenizer.json")
        cfg = ModelConfig(**fields)
        shapes = {name: value.shape for name, value in checkpoint.flatten(
            nnx.state(checkpoint.abstract_model(cfg))).items()}
        rules = _piece_rules(cfg, reader)
        tensors = {}
        for name, shape in shapes.items():
            if name not in rules:
                raise ValueError(f"moesaic tensor {name} has no Hugging Face source")
            n_lead, fn = rules[name]
            tensors[name] = _StackedTensor(name, shape, cfg.param_dtype, n_lead, fn)
        log(f"import-hf: {hf['model_type']} L={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads} "
            f"KV={cfg.n_kv_heads} E={cfg.n_experts} top_k={cfg.top_k} {cfg.param_dtype}")
        needed = set().union(*(t.keys() for t in tensors.values()))
        missing = sorted(needed - set(reader.keys()))
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) the config implies are not in {folder}, "
                             f"e.g. {missing[:3]}")
        for name, t in tensors.items():  # before any write: sizes the config cannot lay out
            if t.n_lead <= 1:  # one key per layer (or whole), read as is or reshaped
                key = t.piece_fn(0, 0)[0]
                have, want = reader.shape(key), t.shape[t.n_lead:]
                if int(np.prod(have)) != int(np.prod(want)):
                    raise ValueError(f"{key}: shape {have} cannot be laid out as {name} "
                                     f"of {want} per layer; config.json (hidden_size, "
                                     "num_attention_heads, num_key_value_heads, head_dim, "
                                     "vocab_size) and the weights disagree")
        unused = [k for k in reader.keys() if k not in needed
                  and not k.endswith(IGNORED_KEY_SUFFIXES)
                  and not (not cfg.is_moe and k.endswith(".mlp.gate.weight"))]
        if unused:
            raise ValueError(f"{len(unused)} tensor(s) have no place in the moesaic model, "
                             f"e.g. {unused[:3]}; the config does not describe these weights")
        meta = {"kind": "public", "model": cfg.to_dict(),
                "hf": {"source": str(folder.resolve()), "config": hf}}
        sources = {name: streaming.TensorSource(t.shape, t.dtype, t.layer_blocks)
                   for name, t in tensors.items()}
        files = {"tokenizer.json": folder / "tokenizer.json"} if tokenizer is None else None
        streaming.save_streaming(out, sources, meta, overwrite=overwrite, files=files)
    meta = checkpoint.read_meta(out)
    log(f"import-hf: wrote {out} ({len(tensors)} tensors, fingerprint {meta['fingerprint'][:12]})")
    return meta
