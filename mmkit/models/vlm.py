"""The vision-language model: encoder -> connector -> image embeddings placed in the decoder's input."""
from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
from torch import nn

from mmkit.core.errors import DataError
from mmkit.models.connectors.connector import Connector
from mmkit.models.decoders.language_decoder import LanguageDecoder
from mmkit.models.encoders.vision_encoder import VisionEncoder
from mmkit.models.kv_cache import preallocated_cache


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder: VisionEncoder, connector: Connector, decoder: LanguageDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.decoder = decoder
        self.num_image_tokens = connector.num_output_tokens(encoder.num_tokens)

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.decoder.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images ``[n,3,H,W]`` -> embeddings ``[n, num_image_tokens, E]`` in the decoder's space.
        uint8 images (as training's data pipeline ships them) are normalised here first."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.encoder.image_stats.normalize(pixel_values)
        if self.encoder.frozen:
            with torch.no_grad():
                image_features = self.encoder(pixel_values)
        else:
            image_features = self.encoder(pixel_values)
        return self.connector(image_features)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder input embeddings with image embeddings scattered into the ``<image>`` positions.

        The ``<image>`` placeholders were expanded at tokenization time, so each image owns
        ``num_image_tokens`` consecutive positions; images fill them in reading order.
        ``image_embeds`` (from :meth:`encode_images`) stand in for ``pixel_values`` when a caller
        reuses one image across many prompts, as a chat does across its turns.
        """
        inputs_embeds = self.decoder.embed_tokens(input_ids)
        image_positions = input_ids == self.image_token_id
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        num_images = 0 if image_embeds is None else image_embeds.shape[0]
        # Ids without values (meta tensors, and fake ones, whose storage is on the meta device: a
        # step traced for its memory) have no positions to count.
        num_positions = None if image_positions.untyped_storage().device.type == "meta" else int(image_positions.sum())
        if num_positions is not None and num_positions != num_images * self.num_image_tokens:
            raise DataError(
                f"the batch has {num_positions} image-token positions but {num_images} images x "
                f"{self.num_image_tokens} tokens each; the data was tokenized for another encoder/connector"
            )
        if num_images == 0:
            return inputs_embeds
        return inputs_embeds.masked_scatter(image_positions.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sample_lengths: list[int] | None = None,
    ) -> Any:
        """Padded rows come with ``attention_mask``; packed rows with ``position_ids`` that restart
        at each sample, no mask, and the samples' lengths (see :mod:`mmkit.data.collate`)."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        if pixel_values is None and self.training and torch.is_grad_enabled():
            # LLaVA's zero image for text-only batches: the encoder and connector join the graph
            # with a zero gradient, so every trained weight has one on every rank (DDP's
            # all-reduce waits for each of them, FSDP's reduce-scatter for each unit).
            inputs_embeds = inputs_embeds + 0 * self._blank_image_embeds().sum().to(inputs_embeds.dtype)
        packed: dict[str, Any] = {}
        if sample_lengths:
            # flash-attention's varlen convention, which packed_sdpa reads too: cumulative offsets
            # and the longest sample.
            offsets = torch.tensor([0, *itertools.accumulate(sample_lengths)], dtype=torch.int32)
            offsets = offsets.to(input_ids.device, non_blocking=True)
            # The per-sample path reads the lengths from here as ints: no device sync, and fake
            # tensors (mmkit.plan) have no values to read. Compiled code never looks at it.
            offsets.sample_lengths = list(sample_lengths)
            longest = max(sample_lengths)
            packed = {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}
        # No KV cache: a forward pass for the loss never reuses one, and transformers recognises
        # packed rows by their position ids only when no cache is passed.
        return self.decoder.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            **packed,
        )

    def _blank_image_embeds(self) -> torch.Tensor:
        """The embeddings of one all-zero (already normalised) image."""
        reference = next(self.encoder.parameters())
        size = self.encoder.image_stats.size
        return self.encode_images(torch.zeros(1, 3, size, size, dtype=reference.dtype, device=reference.device))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        image_embeds: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids only (prompts left-padded), through a KV cache that grows in place
        (:mod:`mmkit.models.kv_cache`). Layers compiled for training (``decoder.compile``) run
        eagerly here: every decoding step is a new shape, and compiling them would use up
        torch.compile's recompile limit, after which training batches would run uncompiled too."""
        inputs_embeds = self.embed(input_ids, pixel_values, image_embeds)
        tokenizer = self.tokenizer
        if not {"cache", "past_key_values"} & generate_kwargs.keys():
            generate_kwargs.update(preallocated_cache(self.decoder.model, inputs_embeds.shape[1], max_new_tokens))
        with _uncompiled():
            return self.decoder.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **generate_kwargs,
            )


def _uncompiled() -> contextlib.AbstractContextManager:
    """Compiled code runs as plain eager code inside (PyTorch 2.6 and later; earlier versions have
    no such switch and compile generation's shapes too)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()
