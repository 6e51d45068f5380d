"""A checkpoint -> a Hugging Face folder that transformers.AutoModelForCausalLM loads.

    python -m minialign.training.hf_export --ckpt out/dpo --out hf_dpo [--dtype bfloat16]

Writes config.json (LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM), model.safetensors (names by
minialign.models.hf_weights.hf_name) and the tokenizer (minialign.data.hf_tokenizer.export_tokenizer). A LoRA
run is merged into its base on the fly; a reward model exports its backbone as a causal LM (no score head).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minialign.data.hf_tokenizer import export_tokenizer
from minialign.errors import UserError, run_cli
from minialign.models.decoder import CausalLM, ScalarModel
from minialign.models.hf_weights import hf_name, model_config_to_hf
from minialign.training.checkpoint import load, load_model


def export_hf(model, tokenizer_source, out_folder, dtype: torch.dtype | None = None) -> Path:
    """Write out_folder/config.json + model.safetensors (+ tokenizer files) for transformers.

    model: CausalLM, or a ScalarModel with tied embeddings (its backbone exported as a causal LM; the score
    head is not exported). tokenizer_source: None, an HF folder / HFTokenizer (files copied), or our
    sentencepiece tokenizer.model / Tokenizer (converted). dtype: of the saved weights (default: the model's).
    """
    cfg = model.cfg
    if isinstance(model, ScalarModel) and not cfg.tie_embeddings:
        raise ValueError("this scalar (reward/value) model has no LM head (untied embeddings, lm_head dropped): "
                         "it cannot be exported as a causal LM")
    hf_cfg = model_config_to_hf(cfg)  # refuses what no HF architecture holds, before anything is written
    from safetensors.torch import save_file

    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("score_head."):
            continue
        state[hf_name(name)] = t.detach().to(dtype or t.dtype).contiguous().cpu()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    if tokenizer_source is not None:
        hf_cfg.update(export_tokenizer(tokenizer_source, out, model_max_length=cfg.max_seq_len))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out


def _load_checkpoint_model(ckpt_path):
    """Our checkpoint as a plain model: a LoRA run's adapters merged into its base (checkpoint.load_model)."""
    path = Path(ckpt_path)
    return load_model(path, kind=load(path)["model_kind"])


def _tokenizer_next_to(folder: Path):
    if (folder / "tokenizer.json").exists():
        return folder
    if (folder / "tokenizer.model").exists():
        return folder / "tokenizer.model"
    return None


def main(argv=None):
    """python -m minialign.training.hf_export --ckpt out/dpo --out hf_dpo [--tokenizer T] [--dtype bfloat16]."""
    ap = argparse.ArgumentParser(prog="python -m minialign.training.hf_export", description="Export a minialign "
                                 "checkpoint to a Hugging Face folder (config.json + model.safetensors + tokenizer), "
                                 "loadable by transformers.AutoModelForCausalLM.")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (with ckpt.pt) or the ckpt.pt file itself")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tokenizer", default="", help="tokenizer.model or HF tokenizer folder (default: the one "
                    "next to the checkpoint; '' and none there = export the weights only)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the saved weights (bfloat16 halves the file)")
    args = ap.parse_args(argv)
    ckpt_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    model = _load_checkpoint_model(args.ckpt)
    tok_source = args.tokenizer or _tokenizer_next_to(ckpt_dir)
    try:
        out = export_hf(model, tok_source, args.out, dtype=getattr(torch, args.dtype))
    except ValueError as e:
        raise UserError(str(e)) from e
    note = "" if isinstance(model, CausalLM) else " (scalar model: backbone as causal LM, score head not exported)"
    print(f"exported {args.ckpt} -> {out} ({model_config_to_hf(model.cfg)['architectures'][0]}{note}; "
          f"tokenizer: {tok_source or 'none'})")


if __name__ == "__main__":
    run_cli(main)
