"""Hugging Face GPT-2 checkpoint folders <-> (GPT2Config, params); numpy + safetensors, torch optional."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.interop.tokenizer import EOT_ID, save_hf_tokenizer
from gpt2_jax.model import GPT2Config, to_layout

_PREFIX = "transformer."
# Buffers that older checkpoints carry and the model recomputes.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFFormatError(UserError, ValueError):
    """A folder that is not a GPT-2 checkpoint we can read exactly; the message says why."""


# --- the key map ---------------------------------------------------------------------------


def _layer_map(i: int) -> dict[str, tuple[str, ...]]:
    h = f"h.{i}."
    p = (f"h_{i}",)
    return {
        h + "ln_1.weight": p + ("ln_1", "scale"),
        h + "ln_1.bias": p + ("ln_1", "bias"),
        h + "attn.c_attn.weight": p + ("attn", "c_attn", "kernel"),
        h + "attn.c_attn.bias": p + ("attn", "c_attn", "bias"),
        h + "attn.c_proj.weight": p + ("attn", "c_proj", "kernel"),
        h + "attn.c_proj.bias": p + ("attn", "c_proj", "bias"),
        h + "ln_2.weight": p + ("ln_2", "scale"),
        h + "ln_2.bias": p + ("ln_2", "bias"),
        h + "mlp.c_fc.weight": p + ("mlp", "c_fc", "kernel"),
        h + "mlp.c_fc.bias": p + ("mlp", "c_fc", "bias"),
        h + "mlp.c_proj.weight": p + ("mlp", "c_proj", "kernel"),
        h + "mlp.c_proj.bias": p + ("mlp", "c_proj", "bias"),
    }


def key_map(config: GPT2Config) -> dict[str, tuple[str, ...]]:
    """HF tensor name (without `transformer.`) -> path in our unrolled params. HF's Conv1D
    weights are already [in, out], like our kernels, so no tensor is transposed; c_attn's
    (D, 3*D) is reshaped to our head-major (D, 3, H, Dh) (the same memory order), and scanned
    layers are stacked from / unstacked to h.{i} (see to_layout)."""
    mapping = {
        "wte.weight": ("wte",),
        "wpe.weight": ("wpe",),
        "ln_f.weight": ("ln_f", "scale"),
        "ln_f.bias": ("ln_f", "bias"),
    }
    for i in range(config.n_layer):
        mapping.update(_layer_map(i))
    return mapping


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape in an HF checkpoint of this architecture (unpadded vocab)."""
    D, V, P = config.n_embd, config.vocab_size, config.n_positions
    shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    per_layer = {
        "ln_1.weight": (D,), "ln_1.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
        "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
        "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,),
        "mlp.c_proj.weight": (4 * D, D), "mlp.c_proj.bias": (D,),
    }
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


# --- config.json ---------------------------------------------------------------------------


def config_from_hf(hf: dict, **overrides) -> GPT2Config:
    """GPT2Config from a transformers config.json dict; refuses variants we would get wrong."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFFormatError(f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' is supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise HFFormatError(f"activation_function {act!r} is not GPT-2's tanh GELU ({', '.join(_TANH_GELUS)})")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    checks = {
        "n_inner": n_inner in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is False,
        "add_cross_attention": hf.get("add_cross_attention", False) is False,
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is True,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise HFFormatError(f"config.json sets {', '.join(bad)} to a value this GPT-2 does not implement")
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        n_positions=hf.get("n_positions", 1024),
        n_embd=n_embd,
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )  # HF's *_pdrop (0.1 in the hub configs) is not taken: the training config sets dropout.
    fields.update(overrides)
    try:
        return GPT2Config(**fields)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"config.json: {e}") from None


def config_to_hf(config: GPT2Config) -> dict:
    """A transformers GPT2Config dict for `config` (vocab padding is never exported)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "float32",
    }


# --- reading -------------------------------------------------------------------------------


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors = {}
    for f in files:
        with safe_open(f, framework="numpy") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise HFFormatError(
            f"{file} is a PyTorch pickle and torch is not installed; install torch or convert "
            "the folder to model.safetensors"
        ) from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return _read_safetensors([single])
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return _read_safetensors([os.path.join(path, s) for s in shards])
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(pt):
        return _read_torch_bin(pt)
    raise HFFormatError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        out[k[len(_PREFIX):] if k.startswith(_PREFIX) else k] = v
    return out


def _check_lm_head(tensors: dict[str, np.ndarray]) -> None:
    head = tensors.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in tensors and not np.array_equal(head, tensors["wte.weight"]):
        raise HFFormatError("lm_head.weight differs from wte.weight; only tied GPT-2 heads are supported")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_from_hf_tensors(config: GPT2Config, tensors: dict[str, np.ndarray]) -> dict:
    """Our float32 params pytree (numpy) from HF tensors (keys with or without `transformer.`)."""
    tensors = _strip(tensors)
    _check_lm_head(tensors)
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise HFFormatError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise HFFormatError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    params: dict = {}
    for name, path in key_map(config).items():
        value = np.asarray(tensors[name], dtype=np.float32)
        if value.shape != shapes[name]:
            raise HFFormatError(f"tensor {name!r} has shape {value.shape}, expected {shapes[name]} from config.json")
        _set(params, path, value)
    params["wte"] = _pad_rows(params["wte"], config.padded_vocab_size)
    return to_layout(params, config)


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    if w.shape[0] == rows:
        return w
    return np.concatenate([w, np.zeros((rows - w.shape[0], w.shape[1]), w.dtype)])


def load_hf(path: str, **config_overrides) -> tuple[GPT2Config, dict]:
    """Read an HF GPT-2 folder (config.json + weights) -> (GPT2Config, float32 numpy params).
    `config_overrides` (e.g. dtype='bfloat16', vocab_pad_multiple=128) apply to the config."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise HFFormatError(f"{path} is not a Hugging Face model folder: no config.json")
    with open(cfg_file) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{cfg_file} is not valid JSON: {e}") from None
    config = config_from_hf(hf_config, **config_overrides)
    return config, params_from_hf_tensors(config, _read_tensors(path))


# --- writing -------------------------------------------------------------------------------


def _get(tree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def params_to_hf_tensors(config: GPT2Config, params) -> dict[str, np.ndarray]:
    """HF tensors (`transformer.` keys, as save_pretrained writes them) from our params;
    vocab padding rows are trimmed; layers unstacked, c_attn flattened to HF's (D, 3*D)."""
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
    params = to_layout(params, config.replace(scan_layers=False))
    shapes, tensors = expected_shapes(config), {}
    for name, path in key_map(config).items():
        value = _get(params, path)
        value = value[: config.vocab_size] if name == "wte.weight" else value.reshape(shapes[name])
        tensors[_PREFIX + name] = np.ascontiguousarray(value)
    return tensors


def _generation_config() -> dict:
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}


def save_hf(path: str, config: GPT2Config, params, *, overwrite: bool = False) -> None:
    """Write an HF folder (config.json, model.safetensors, generation_config.json, tokenizer
    files) that transformers loads offline. Written to a temporary folder and renamed into place,
    so a failure leaves nothing half-written; a non-empty `path` needs `overwrite=True`."""
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        save_file(params_to_hf_tensors(config, params), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), config_to_hf(config))
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config())
        save_hf_tokenizer(tmp, model_max_length=config.n_positions)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(file: str, obj: dict) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
