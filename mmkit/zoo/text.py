"""The synthetic world's text, and a byte-level BPE tokenizer trained on it."""
from __future__ import annotations

import random
from pathlib import Path

from mmkit.data.templates.base import LLAVA_SYSTEM
from mmkit.synth.llava_data import write_text_corpus

# Tokenizer ids: eos must not be id 2, which CLIP's text tower treats as "pool at the largest id".
SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "</s>"]
VOCAB_SIZE = 768


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmkit.zoo import scaled

    corpus = write_text_corpus(count=scaled(3000), seed=0) + [LLAVA_SYSTEM, "USER: ASSISTANT: ###Human: ###Assistant:"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1024,
    ).save_pretrained(out)


def conversations_as_text(split: str, count: int, seed: int) -> list[list[dict]]:
    """Image-free LLaVA conversations about ``count`` scenes of ``split`` (captions included as
    one-turn descriptions), for pretraining the LM on the world's language."""
    from mmkit.datagen.base import build_teacher
    from mmkit.synth.llava_data import scene_rng
    from mmkit.synth.world import generate_scenes, symbolic_view

    teachers = [build_teacher("caption", {}), build_teacher("rules", {})]
    conversations = []
    for scene in generate_scenes(split, count, seed):
        rng = scene_rng(seed, scene)
        view = symbolic_view(scene, rng)
        for teacher in teachers:
            for written in teacher.write(view, rng):
                conversations.append(
                    [{"from": t["from"], "value": t["value"].replace("<image>", "").strip()} for t in written.conversation]
                )
    random.Random(seed).shuffle(conversations)
    return conversations
