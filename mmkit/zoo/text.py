"""The synthetic world's text, and a byte-level BPE tokenizer trained on it."""
from __future__ import annotations

import random
from pathlib import Path

from mmkit.data.templates.template import LLAVA_SYSTEM
from mmkit.datagen.rules import QUESTION_KINDS, ask, statements
from mmkit.datagen.teacher import build_teacher
from mmkit.synth.llava_data import scene_rng, write_text_corpus
from mmkit.synth.world import captions, generate_scenes, symbolic_view
from mmkit.zoo.scale import scaled, write_quality

# Tokenizer ids: eos must not be id 2, which CLIP's text tower treats as "pool at the largest id".
SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "</s>"]
VOCAB_SIZE = 768
# Share of LM pretraining conversations that carry the scene as text where the image would be.
CONTEXT_SHARE = 0.8


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = write_text_corpus(count=scaled(3000), seed=0) + [LLAVA_SYSTEM, "USER: ASSISTANT: ###Human: ###Assistant:"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # BOS at the head of every text, as Llama's tokenizer puts it: LLaVA's tokenization keeps the
    # BOS the tokenizer adds, and only that one.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1024,
    )
    fast.save_pretrained(out)
    val_captions = [caption for scene in generate_scenes("val", 200, seed=0) for caption in captions(scene, random.Random(0))]
    write_quality(out, {
        "vocab_size": len(fast),
        "val_tokens_per_caption": round(sum(len(fast(c).input_ids) for c in val_captions) / len(val_captions), 2),
        "val_words_per_caption": round(sum(len(c.split()) for c in val_captions) / len(val_captions), 2),
    })


def conversations_as_text(split: str, count: int, seed: int) -> list[list[dict]]:
    """LLaVA conversations about ``count`` scenes of ``split`` with the image replaced by text.

    Most conversations give the scene as a caption that states every object's place, where the
    image would be; the reply must then be read from that context, which is how the LM learns to
    look things up in its prompt (as Vicuna can before LLaVA's stages). The rest carry no context
    at all, so the LM also knows the world's priors and the replies' wording.
    """

    teachers = [build_teacher("caption", {}), build_teacher("rules", {})]
    conversations = []
    for scene in generate_scenes(split, count, seed):
        rng = scene_rng(seed, scene)
        view = symbolic_view(scene, rng)
        placed = [caption for caption in view["captions"] if " in the " in caption]
        for teacher in teachers:
            for written in teacher.write(view, rng):
                context = rng.choice(placed) if rng.random() < CONTEXT_SHARE else ""
                conversations.append([
                    {"from": t["from"], "value": t["value"].replace("<image>", context).strip()}
                    for t in written.conversation
                ])
    random.Random(seed).shuffle(conversations)
    return conversations


def caption_questions(split: str, count: int, seed: int, per_caption: int = 1) -> list[tuple[int, list[dict]]]:
    """(objects in the scene, conversation) pairs: a placed caption followed by ``per_caption``
    exact-answer questions about the scene, each with its answer; with 1, one conversation per
    (scene, question type). Several questions per caption give the lookup several supervised
    answers per sequence."""
    rng = random.Random(seed)
    conversations = []
    for scene in generate_scenes(split, count, seed):
        placed = [c for c in captions(scene, rng) if " in the " in c]
        asked = [qa for qa in (ask(kind, scene.objects, rng) for kind in QUESTION_KINDS * per_caption) if qa is not None]
        rng.shuffle(asked)
        for start in range(0, len(asked), per_caption):
            conversation = []
            for turn, qa in enumerate(asked[start : start + per_caption]):
                question = f"{rng.choice(placed)}\n{qa.question}" if turn == 0 else qa.question
                conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
            conversations.append((len(scene.objects), conversation))
    rng.shuffle(conversations)
    return conversations


def caption_statements(split: str, count: int, seed: int) -> list[tuple[int, list[dict]]]:
    """(objects in the scene, conversation) pairs: a placed caption, answered by ``statements``
    about every object it can name (``LlamaRecipe.data = "qa+statements"``)."""
    rng = random.Random(seed)
    conversations = []
    for scene in generate_scenes(split, count, seed):
        caption = rng.choice([c for c in captions(scene, rng) if " in the " in c])
        conversation = [{"from": "human", "value": caption}, {"from": "gpt", "value": " ".join(statements(scene.objects, rng))}]
        conversations.append((len(scene.objects), conversation))
    return conversations
