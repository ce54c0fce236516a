"""Test helper: randomly initialised transformers GPT-2 models (no download) and their HF folders."""

import numpy as np
import torch
import transformers


def hf_model(seed=0, vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4, scale=0.2):
    """A GPT2LMHeadModel with weights large enough that a mismatch would show in the logits:
    HF's std-0.02 init makes logits so small that many bugs stay under 1e-4."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def save_folder(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)
