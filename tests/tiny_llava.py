"""A tiny, randomly initialised LLaVA-1.5 built offline, saved like a hub checkpoint.

Everything a user's checkpoint directory holds is here, only small: a CLIP vision tower and a
Llama language model (hidden 32, 2 layers), a byte-level BPE tokenizer trained in-process with
an `<image>` token, the llava-1.5 chat template, and a processor written with
`save_pretrained`, so code under test loads it by path exactly as it would load
`llava-hf/llava-1.5-7b-hf`.
"""

from __future__ import annotations

import os

# The llava-1.5 chat template as shipped with the llava-hf checkpoints.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: <image>\nClassify foreground vs. background ASSISTANT: foreground: cat, "
    "background: the surrounding scene",
    "Locate all dog instances ASSISTANT: objects: dog, dog, background: the surrounding scene",
    "foreground background objects instances classify locate all the surrounding scene",
    "cat dog bird horse zero one two three four five six seven eight nine digit",
    "grass sky water wall floor road tree field indoor outdoor texture",
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: a BOS token in front of every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


# Sizes of a LLaVA-1.5 7B (CLIP ViT-L/14 at 336 px + a Llama-2 7B language model).
LLAVA15_7B = dict(
    image_size=336, patch_size=14, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, vocab_size=32064,
    max_positions=4096,
)
# A CPU-sized model with LLaVA-1.5's 24x24 grid (576 image tokens), for memory measurements.
LLAVA_SMALL = dict(
    image_size=336, patch_size=14, hidden=256, layers=4, heads=8, kv_heads=8, intermediate=512,
    vision_hidden=64, vision_layers=2, vision_heads=4, vision_intermediate=128,
)


def make_tokenizer():
    """The in-process byte-level BPE tokenizer with an `<image>` token (left padding)."""
    return _train_tokenizer(vocab_size=420)


def llava_config(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vision_hidden: int | None = None,
    vision_layers: int = 2,
    vision_heads: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int | None = None,
    max_positions: int = 1024,
    select_strategy: str = "default",
):
    """A LlavaConfig (CLIP vision tower, Llama language model) of the given sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_hidden = vision_hidden or hidden
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
    )


def save_processor(path, tokenizer, *, image_size: int, patch_size: int, do_pad: bool = True,
                   select_strategy: str = "default") -> None:
    """Writes a LlavaProcessor (PIL image processor, the tokenizer, the llava-1.5 template)."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=do_pad,
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(os.fspath(path))


def build_tiny_llava(
    path: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    do_pad: bool = True,
    select_strategy: str = "default",
    seed: int = 0,
    sharpen: float = 8.0,
    **sizes,
) -> str:
    """Writes a small random LLaVA checkpoint (model, tokenizer, processor) to `path`.

    Defaults: hidden 32, 2 layers, 4 heads (2 key/value heads), 32 px images in 8 px patches.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    path = os.fspath(path)
    tokenizer = make_tokenizer()
    sizes.setdefault("kv_heads", max(1, heads // 2))  # grouped-query: repeat_kv is exercised
    config = llava_config(tokenizer, image_size=image_size, patch_size=patch_size, hidden=hidden,
                          layers=layers, heads=heads, select_strategy=select_strategy, **sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform attention; sharpen the language model a little so maps
    # carry structure (and a wrong span or a wrong column shows up in the comparison).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(sharpen)
    model.save_pretrained(path)
    save_processor(path, tokenizer, image_size=image_size, patch_size=patch_size, do_pad=do_pad,
                   select_strategy=select_strategy)
    return path
