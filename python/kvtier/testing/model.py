"""A small random-initialised Llama that vLLM's CPU build can serve offline.

Tests, the demo and the TTFT benchmark need a real model but no network. This
module writes one with transformers (random weights from a fixed seed) and a
WordLevel tokenizer built with `tokenizers`, into a directory named by a hash
of everything that shapes it, so a second call returns the cached copy. The
directory is written under a temporary name and renamed into place, so
concurrent makers (pytest-xdist, the demo next to a test run) never see half
a model.

Shape facts that matter for vLLM CPU: head_dim must be one of its supported
sizes (64 here); fp32 runs everywhere. `initializer_range` is larger than
Llama's 0.02 so that greedy decoding has a clear argmax: with near-uniform
logits, the last-bit differences between a prefill that loaded its prefix
from a cache and one that computed it could flip a token, and equality tests
would flake for reasons that have nothing to do with the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the on-disk format or the weight recipe changes: old cache
# entries then stop matching instead of being reused.
_RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the model's bytes."""

    hidden_size: int = 512
    num_layers: int = 8
    num_attention_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    vocab_words: int = 2000
    max_position_embeddings: int = 16384
    dtype: str = "float32"
    seed: int = 1234
    initializer_range: float = 0.08

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def digest(self) -> str:
        blob = json.dumps(
            {"recipe": _RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Special tokens come first so their ids are stable: 0 pad, 1 unk, 2 bos, 3 eos.
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
NUM_SPECIAL_TOKENS = len(_SPECIALS)


def word(i: int) -> str:
    """The i-th ordinary vocabulary word (token id i + NUM_SPECIAL_TOKENS)."""
    return f"w{i}"


def default_cache_dir() -> Path:
    root = os.environ.get("KVTIER_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kvtier"
    )
    return Path(root) / "models"


def make_model(spec: ModelSpec | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the directory of the model for `spec`, creating it if absent."""
    spec = spec or ModelSpec()
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if spec.num_attention_heads % spec.num_kv_heads:
        raise ValueError("num_attention_heads must be a multiple of num_kv_heads")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"llama-{spec.digest()}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        _write_model(spec, staging)
        (staging / ".complete").write_text(spec.digest())
        try:
            os.rename(staging, target)
        except OSError:
            # Another maker won the race; its copy is identical by construction.
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_model(spec: ModelSpec, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for i in range(spec.vocab_words):
        vocab[word(i)] = i + NUM_SPECIAL_TOKENS
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)


def random_tokens(n: int, seed: int, spec: ModelSpec | None = None) -> list[int]:
    """n ordinary (non-special) token ids, reproducible from `seed`."""
    import numpy as np

    spec = spec or ModelSpec()
    rng = np.random.default_rng(seed)
    return (rng.integers(0, spec.vocab_words, size=n) + NUM_SPECIAL_TOKENS).tolist()


def main() -> None:
    print(make_model())


if __name__ == "__main__":
    main()


def make_lora_adapter(
    out: str | os.PathLike[str], seed: int, spec: ModelSpec | None = None, rank: int = 8, scale: float = 0.5
) -> Path:
    """Writes a random PEFT LoRA adapter (q_proj and v_proj of every layer)
    for the model of `spec` into `out`, by hand (no peft needed): the
    adapter_config.json and adapter_model.safetensors vLLM loads. `scale`
    is large enough that two adapters change greedy outputs."""
    import torch
    from safetensors.torch import save_file

    spec = spec or ModelSpec()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": "kvtier-test-llama",
    }
    (target / "adapter_config.json").write_text(json.dumps(config, indent=1))
    gen = torch.Generator().manual_seed(seed)
    outs = {"q_proj": spec.num_attention_heads * spec.head_dim, "v_proj": spec.num_kv_heads * spec.head_dim}
    tensors = {}
    for layer in range(spec.num_layers):
        for module, out_features in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(rank, spec.hidden_size, generator=gen) * scale
            b = torch.randn(out_features, rank, generator=gen) * scale
            tensors[f"{prefix}.lora_A.weight"] = a.to(getattr(torch, spec.dtype)).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(getattr(torch, spec.dtype)).contiguous()
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target
