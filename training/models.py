"""Model presets (transformers configs), warm-start loading, and LoRA wrapping.

A preset is only an architecture: the vocabulary comes from the tokenizer it is paired with, so
parameter counts below are quoted for the default 4,096-token vocabulary. Models are plain
transformers models, so every tool that loads a Hugging Face folder (serving, vLLM, evaluation)
loads ours.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

from genloop.training.config import LoraConfig
from genloop.training.errors import UserInputError

# A preset maker takes the vocabulary size and the special token ids of the paired tokenizer.
PresetMaker = Callable[..., PretrainedConfig]


def _gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int) -> PresetMaker:
    def make(vocab_size: int, **token_ids: int) -> PretrainedConfig:
        return GPT2Config(
            vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, **token_ids
        )

    return make


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, context: int) -> PresetMaker:
    def make(vocab_size: int, **token_ids: int) -> PretrainedConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(hidden * 8 / 3 / 32 + 1) * 32,  # SwiGLU width, rounded to 32
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=context,
            tie_word_embeddings=True,
            **token_ids,
        )

    return make


PRESETS: dict[str, PresetMaker] = {
    "tiny": _gpt2(n_embd=128, n_layer=4, n_head=4, n_positions=256),  # ≈1.3M params: tests
    "small": _gpt2(n_embd=384, n_layer=12, n_head=6, n_positions=512),  # ≈23M params
    "gpt2": _gpt2(n_embd=768, n_layer=12, n_head=12, n_positions=1024),  # ≈88M + vocab (124M at 50k)
    "tiny-llama": _llama(hidden=128, layers=4, heads=4, kv_heads=2, context=256),  # ≈1.3M params
    "small-llama": _llama(hidden=384, layers=12, heads=6, kv_heads=2, context=512),  # ≈23M params
}


def context_length(config: PretrainedConfig) -> int:
    """Longest sequence the model's position embeddings allow."""
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, block_size: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model of ``preset`` sized to ``tokenizer``'s vocabulary."""
    if preset not in PRESETS:
        raise UserInputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset](
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if block_size > context_length(config):
        raise UserInputError(
            f"block_size {block_size} exceeds preset {preset!r}'s context of {context_length(config)} tokens"
        )
    torch.manual_seed(seed)
    return _causal_lm(AutoModelForCausalLM.from_config(config))


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Name the model's loss: transformers derives ``loss_type`` from the class name, and GPT-2's
    (``GPT2LMHeadModel``) names none, so each training worker warned that the loss was unknown
    before falling back to the causal-LM loss every model genloop builds is trained with."""
    model.loss_type = "ForCausalLM"
    return model


# What transformers 5 / safetensors raise for a missing, truncated or garbage model folder:
# SafetensorError (a plain Exception subclass) for a bad weights file, OSError for missing files
# or unreadable JSON, ValueError for an unknown architecture, KeyError for a config missing fields,
# RuntimeError for tensors whose shapes do not fit the config.
_LOAD_ERRORS = (SafetensorError, OSError, ValueError, KeyError, RuntimeError)
# transformers' loading path keeps global state (tied-weight bookkeeping among it): two threads
# loading at once were seen to report the tied lm_head as missing. One load at a time per process.
_LOAD_LOCK = threading.Lock()


def check_weights(path: str | Path) -> None:
    """Every weights file of the model folder ``path`` is whole: read from the headers only, so a
    process that hands the folder to others (Serve replicas, Ray Data actors) can refuse a truncated
    or foreign file with one line naming it, instead of each of them failing deep in a traceback."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserInputError(f"cannot load model from {path}: no *.safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserInputError(f"{file}: damaged weights file ({exc})") from None


def load_model(path: str | Path) -> torch.nn.Module:
    """Load a Hugging Face model folder; any defect becomes a UserInputError naming the path.

    A weights file that parses but lacks tensors would otherwise load with those tensors freshly
    initialised (transformers only warns), and a random model would be trained on or judged.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"cannot load model from {path}: no such folder")
    try:
        with _LOAD_LOCK:
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    except _LOAD_ERRORS as exc:
        raise UserInputError(f"cannot load model from {path}: {type(exc).__name__}: {exc}") from exc
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserInputError(f"cannot load model from {path}: weights missing for {', '.join(missing[:5])}")
    return _causal_lm(model)


def with_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` with trainable LoRA adapters; only the adapters receive gradients."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    if targets is None and model.config.model_type == "gpt2":
        targets = ["c_attn", "c_proj", "c_fc"]  # GPT-2's fused Conv1D projections
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    return get_peft_model(model, peft_config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights so the export is a plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters once, tied embeddings counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def pack_folder(folder: Path) -> dict[str, bytes]:
    """A model folder's files by value, for Ray's object store: training workers on any node get the
    initial model from there, where a path would name a folder on the driver's machine."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


@contextmanager
def unpacked(files: dict[str, bytes]) -> Iterator[Path]:
    """``pack_folder``'s files written to a private temporary folder, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="genloop-model-") as directory:
        for name, data in files.items():
            path = Path(directory) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield Path(directory)
