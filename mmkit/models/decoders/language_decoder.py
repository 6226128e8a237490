"""The interface every language decoder implements."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import DECODERS


class LanguageDecoder(nn.Module):
    """A causal LM plus its tokenizer, which holds an ``<image>`` token and a pad token.

    A decoder built with fresh weights from its config alone (``with_fresh_weights``: for planning
    a run, or measuring one on random weights) has no tokenizer, only the ``<image>`` token's id.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def with_fresh_weights(cls, config_overrides: dict[str, Any] | None = None, **options: Any) -> "LanguageDecoder":
        """The decoder its config keys ``options`` describe, with fresh weights on the current default
        device and nothing read but configs; ``config_overrides`` change its architecture's config."""
        raise ConfigError(f"{cls.__qualname__} is built from its weights only: it cannot be built with fresh "
                          "weights (weights='shapes' or 'none')")

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def lora_parameter_names(self) -> set[str]:
        """Names (relative to ``self``) of LoRA adapter weights; empty without LoRA."""
        return set()


DECODERS.set_base(LanguageDecoder)
