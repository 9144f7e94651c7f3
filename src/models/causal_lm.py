"""Causal language models (``model=hf_causal_lm`` / ``smollm2_135m`` / ``tiny_llama``) as the pipeline sees them.

:class:`CausalLM` wraps a Hugging Face ``*ForCausalLM``: token ids ``[B, T]`` in, next-token logits ``[B, T, V]``
out (no KV cache), so every part of the pipeline that runs ``net(x)`` (tracing, timing, checkpoints, masks,
quantization hooks on its ``nn.Linear`` layers) runs it like any other network. It carries its tokenizer
(``encode(text) -> ids``), its context length and whether it is pretrained (a pretrained model skips the train
stage). ``decode_step`` runs one token against a KV cache: the step the decode cost is priced and timed on.

* ``hf_causal_lm``: any ``AutoModelForCausalLM`` by ``name`` (a hub id or a local dir), optionally from a GGUF file
  in it (``gguf_file``; transformers dequantizes it to ``dtype``). Offline by default: nothing reaches a hub unless
  ``offline: false``. Loading is cached per process (the pipeline builds the network once per stage).
* ``tiny_llama``: a LLaMA built from scratch (a few blocks) with a byte tokenizer (256 ids, one per byte), for
  tests and for a model the project trains itself; seeded like every other network.
"""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # an optional extra
        raise ValueError("causal language models need the `transformers`, `gguf` and `accelerate` packages "
                         '(pip install "compress-run[llm]"; `make install` installs them)') from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255): needs no vocabulary file, so a model trained here needs nothing else."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer without special tokens (plain text in, ids out)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def __getstate__(self) -> dict:  # datamodules are pickled by DataLoader workers: keep the tokenizer
        return self.__dict__


class CausalLM(nn.Module):
    """A causal LM: ``forward(tokens [B, T]) -> logits [B, T, V]``."""

    def __init__(self, lm: nn.Module, tokenizer: Any, pretrained: bool, source: str) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.pretrained = pretrained
        self.source = source  # what was loaded / built (the run's summary names it)
        config = lm.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0)
        # transformers 5 names the KV-cache argument `cache` (`past_key_values` before, deprecated since)
        self.cache_argument = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.vocab_size = int(config.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens.long(), use_cache=False).logits

    def prefill(self, tokens: torch.Tensor) -> Any:
        """The KV cache after ``tokens`` (no logits kept beyond the last position)."""
        out = self.lm(input_ids=tokens.long(), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def decode_step(self, token: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits of one new token per sequence (``token`` [B, 1]) given the ``cache`` of the tokens before it;
        the cache grows by that token."""
        return self.lm(input_ids=token.long(), use_cache=True, **{self.cache_argument: cache}).logits

    def describe(self) -> dict[str, Any]:
        c = self.lm.config
        return {"source": self.source, "architecture": type(self.lm).__name__, "layers": c.num_hidden_layers,
                "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
                "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads), "vocab": self.vocab_size,
                "context_length": self.context_length, "tokenizer": self.tokenizer.name,
                "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
                "params": sum(p.numel() for p in self.parameters())}


def is_causal_lm(net: nn.Module) -> bool:
    return isinstance(net, CausalLM)


def _missing(name: str, gguf_file: str | None, offline: bool, exc: Exception) -> ValueError:
    where = f"{name}/{gguf_file}" if gguf_file else name
    fetch = ("`make llm-data` fetches SmolLM2-135M (model=smollm2_135m) into the data dir"
             if "smollm2" in where.lower() else "download the model into a local dir and set model.name to it")
    hub = " or set model.offline=false to let transformers download it from the hub" if offline else ""
    return ValueError(f"model.name={where} could not be loaded ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): {fetch}{hub}")


@functools.lru_cache(maxsize=2)
def _pretrained(name: str, gguf_file: str | None, offline: bool, dtype: str) -> tuple[nn.Module, Any]:
    transformers = _transformers()
    if gguf_file and not (Path(name) / gguf_file).is_file() and offline:
        raise _missing(name, gguf_file, offline, FileNotFoundError(f"no file {Path(name) / gguf_file}"))
    keys: dict[str, Any] = {"local_files_only": offline}
    if gguf_file:
        keys["gguf_file"] = gguf_file
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **keys)
        lm = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **keys)
    except (OSError, ValueError, ImportError) as exc:
        raise _missing(name, gguf_file, offline, exc) from exc
    return lm.eval(), HFTokenizer(tokenizer, Path(name).name + (f"/{gguf_file}" if gguf_file else ""))


def hf_causal_lm(name: str, gguf_file: str | None = None, offline: bool = True, dtype: str = "float32") -> CausalLM:
    """A pretrained ``AutoModelForCausalLM`` (a copy of the process's cached load)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    key = (str(name), gguf_file, bool(offline), dtype)
    lm, tokenizer = _pretrained(*key)
    net = CausalLM(copy.deepcopy(lm).requires_grad_(True), tokenizer, pretrained=True,
                   source=str(name) + (f" ({gguf_file})" if gguf_file else ""))
    net.load_key = key
    return net


def pretrained_original(net: CausalLM) -> CausalLM | None:
    """The pretrained model ``net`` was loaded as, sharing the process's cached weights (no copy: for reading
    only, e.g. as the reference compressed models are compared with); None for a model built here."""
    key = getattr(net, "load_key", None)
    if key is None:
        return None
    lm, tokenizer = _pretrained(*key)
    original = CausalLM(lm, tokenizer, pretrained=True, source=net.source)
    return original.eval()  # its parameters keep requires_grad: every later copy of the cache must train


def tiny_llama(hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
               intermediate_size: int = 384, context_length: int = 1024, tie_embeddings: bool = True) -> CausalLM:
    """A LLaMA (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP) built from scratch over bytes."""
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"model.hidden_size={hidden_size} must be a multiple of model.heads={heads}, and heads a "
                         f"multiple of model.kv_heads={kv_heads}")
    transformers = _transformers()
    tokenizer = ByteTokenizer()
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                                      intermediate_size=intermediate_size, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=context_length, tie_word_embeddings=tie_embeddings,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    lm = transformers.LlamaForCausalLM(config)
    return CausalLM(lm, tokenizer, pretrained=False, source=f"tiny_llama({hidden_size}x{layers})")
