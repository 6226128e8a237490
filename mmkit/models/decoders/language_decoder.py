"""The interface every language decoder implements."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import DECODERS


class LanguageDecoder(nn.Module):
    """A causal LM plus its tokenizer, which holds an ``<image>`` token and a pad token."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def lora_parameter_names(self) -> set[str]:
        """Names (relative to ``self``) of LoRA adapter weights; empty without LoRA."""
        return set()


DECODERS.set_base(LanguageDecoder)
