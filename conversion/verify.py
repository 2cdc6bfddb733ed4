"""Parity of a converted checkpoint with transformers' reference implementation on the same weights.

Both models get the same tensors (our processor's output); we compare the logits of the whole prompt,
greedy tokens, and the processors themselves (token ids identical, pixels within one 8-bit level).
"""

from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from vlm_patterns.processing.processing_fuyu import ANSWER_MARK

from .checkpoint_io import read_json, resolve_source

# Largest logit difference accepted per dtype: float32 rounding for fp32, the dtype's own rounding otherwise.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def pixel_agreement(reference: torch.Tensor, ours: torch.Tensor, std: list[float]) -> tuple[float, float]:
    """(largest difference, share of values within one level), in 8-bit levels (undoing the division by std)."""
    levels = (reference.float() - ours.float()).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255
    return levels.max().item(), (levels <= 1.0 + 1e-3).float().mean().item()


def pixels_agree(max_levels: float, share_within_one: float) -> bool:
    """Our torch resize against PIL: on photographs at most two levels apart, nearly all pixels within one
    (processing/image_ops.py explains the rounding behind the rare two)."""
    return max_levels <= 2.0 + 1e-3 and share_within_one >= 0.9999


@dataclass
class ParityReport:
    max_logit_diff: float
    logit_tolerance: float
    reference_tokens: list[int]
    our_tokens: list[int]
    input_ids_equal: bool
    max_pixel_diff_levels: float
    share_pixels_within_one_level: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.input_ids_equal
            and pixels_agree(self.max_pixel_diff_levels, self.share_pixels_within_one_level)
            and self.max_logit_diff <= self.logit_tolerance
            and self.reference_tokens == self.our_tokens
        )

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"{verdict}: max |logit diff| {self.max_logit_diff:.3g} (tolerance {self.logit_tolerance:g})",
            f"  token ids identical: {self.input_ids_equal}; pixels at most {self.max_pixel_diff_levels:.2f} 8-bit levels "
            f"apart, {100 * self.share_pixels_within_one_level:.3f}% within one",
            f"  greedy tokens  reference {self.reference_tokens}",
            f"                 ours      {self.our_tokens}",
        ]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def default_test_image() -> PIL.Image.Image:
    from .tiny import photo_like_image

    return photo_like_image(320, 240, seed=1)


# What the reference models read; our processors may add outputs meant for post-processing.
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


def _compare(
    reference, ours, inputs: dict, reference_extra: dict, max_new_tokens: int
) -> tuple[float, list[int], list[int]]:
    """Both models on the same tensors (the reference gets the model inputs, plus `reference_extra`)."""
    reference_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS} | reference_extra
    with torch.no_grad():
        reference_logits = reference(**reference_inputs).logits.float()
        our_logits = ours(**inputs).logits.float()
    diff = (reference_logits - our_logits).abs().max().item()
    generate = dict(max_new_tokens=max_new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    reference_tokens = reference.generate(**reference_inputs, **generate)[0, prompt_length:].tolist()
    our_tokens = ours.generate(**inputs, **generate)[0, prompt_length:].tolist()
    return diff, reference_tokens, our_tokens


@dataclass
class Reference:
    """transformers' implementation of one source layout, loaded on the same weights, and its own inputs for the
    prompt (which must agree with ours); `extra` goes to its forward besides the shared tensors."""

    model: torch.nn.Module
    inputs: dict
    extra: dict = field(default_factory=dict)


def verify(
    reference_for,
    source: str | Path,
    converted: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    images: list | None = None,
    question: str = "What is in the image?",
    max_new_tokens: int = 8,
    few_shot: bool = False,
    resolve: bool = True,
    **sources,
) -> ParityReport:
    """Our converted checkpoint vs `reference_for(source_dir, images, prompt, ours, dtype, device, **sources)` on
    the same weights and the same tensors. Processors are compared too: token ids must be identical, pixels within
    the bound of `pixels_agree`. `few_shot`: an in-context prompt instead of a chat turn (OpenFlamingo's format)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source_dir = resolve_source(source) if resolve else Path(source)
    processor = AutoProcessor.from_pretrained(converted)
    images = (images or [default_test_image()])[: processor.max_images_per_prompt]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if few_shot:
        prompt = processor.few_shot_prompt([f"An image of {i}." for i in range(len(images) - 1)], "An image of")
    inputs = processor(images=[images], text=prompt)
    ours = AutoModelForImageTextToText.from_pretrained(converted, dtype=dtype).to(device).eval()
    reference = reference_for(source_dir, images, prompt, ours, dtype, device, **sources)

    reference_ids = reference.inputs["input_ids"]  # None: the reference reads our token ids (same tokenizer)
    ids_equal = reference_ids is None or torch.equal(reference_ids, inputs["input_ids"])
    pixels = pixel_agreement_for(
        reference.inputs["pixel_values"], inputs["pixel_values"], processor.image_processor.image_std
    )
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    diff, reference_tokens, our_tokens = _compare(reference.model, ours, inputs, reference.extra, max_new_tokens)
    return ParityReport(diff, LOGIT_TOLERANCE[dtype], reference_tokens, our_tokens, ids_equal, *pixels)


def llava_reference(source_dir, images, prompt, ours, dtype, device, vision_tower=None) -> Reference:
    """`LlavaForConditionalGeneration` (llava-hf layout); for the original LLaVA layout, the original forward
    assembled from transformers' `CLIPVisionModel` and `LlamaForCausalLM`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if {"mm_projector_type", "mm_vision_tower"} & set(read_json(source_dir / "config.json")):
        reference = OriginalLlavaReference(source_dir, ours, vision_tower, dtype=dtype).to(device)
        return Reference(reference, reference.process(images, prompt))
    reference = LlavaForConditionalGeneration.from_pretrained(source_dir, dtype=dtype).to(device).eval()
    return Reference(
        reference, AutoProcessor.from_pretrained(source_dir)(images=images, text=prompt, return_tensors="pt")
    )


def qwen2_vl_reference(source_dir, images, prompt, ours, dtype, device) -> Reference:
    from transformers import Qwen2VLForConditionalGeneration

    reference = Qwen2VLForConditionalGeneration.from_pretrained(source_dir, dtype=dtype).to(device).eval()
    inputs = qwen2_vl_reference_inputs(source_dir, images, prompt)
    return Reference(reference, inputs, {"mm_token_type_ids": inputs["mm_token_type_ids"].to(device)})


def fuyu_reference(source_dir, images, prompt, ours, dtype, device) -> Reference:
    from transformers import FuyuForCausalLM

    reference = FuyuForCausalLM.from_pretrained(source_dir, dtype=dtype).to(device).eval()
    # Our chat template ends a generation prompt with the begin-of-answer mark; transformers' FuyuProcessor
    # takes the plain prompt and adds that token itself.
    return Reference(reference, fuyu_reference_inputs(source_dir, images, [prompt.removesuffix(ANSWER_MARK)]))


def idefics_reference(source_dir, images, prompt, ours, dtype, device) -> Reference:
    """`IdeficsForVisionText2Text`, with IdeficsProcessor's image attention mask."""
    from transformers import IdeficsForVisionText2Text

    reference = IdeficsForVisionText2Text.from_pretrained(source_dir, dtype=dtype).to(device).eval()
    inputs = idefics_reference_inputs(source_dir, [images], [prompt])
    return Reference(reference, inputs, {"image_attention_mask": inputs["image_attention_mask"].to(device)})


def openflamingo_reference(checkpoint, images, prompt, ours, dtype, device, vision=None, language=None) -> Reference:
    """OpenFlamingo's forward assembled from its three sources (openflamingo_reference.py: checkpoint.pt, its CLIP
    tower and its base language model), with CLIPImageProcessor for the pixels."""
    from transformers import CLIPImageProcessorPil

    from .openflamingo_reference import OpenFlamingoReference

    if vision is None or language is None:
        raise ValueError("OpenFlamingo verification needs the CLIP tower (vision) and base model (language)")
    reference = OpenFlamingoReference(checkpoint, resolve_source(vision), resolve_source(language), ours, dtype)
    pixels = CLIPImageProcessorPil.from_pretrained(resolve_source(vision))(images, return_tensors="pt")
    inputs = {"input_ids": None, "pixel_values": pixels["pixel_values"]}
    return Reference(
        reference.to(device), inputs, {"eos_token_ids": tuple(_as_list(ours.generation_config.eos_token_id))}
    )


# One entry point per source layout (the registry names them).


def verify_llava(source, converted, *, vision_tower=None, **kwargs) -> ParityReport:
    return verify(llava_reference, source, converted, vision_tower=vision_tower, **kwargs)


def verify_qwen2_vl(source, converted, **kwargs) -> ParityReport:
    return verify(qwen2_vl_reference, source, converted, **kwargs)


def verify_fuyu(source, converted, **kwargs) -> ParityReport:
    return verify(fuyu_reference, source, converted, **kwargs)


def verify_idefics(source, converted, **kwargs) -> ParityReport:
    return verify(idefics_reference, source, converted, **kwargs)


def verify_openflamingo(checkpoint, converted, *, vision=None, language=None, **kwargs) -> ParityReport:
    return verify(openflamingo_reference, checkpoint, converted, few_shot=True, resolve=False, vision=vision,
                  language=language, **kwargs)  # fmt: skip


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def qwen2_vl_reference_inputs(source_dir: Path, images: list, prompt: str) -> dict:
    """What transformers' Qwen2VLProcessor would return (it cannot be built without torchvision): the PIL image
    processor's patches, each `<|image_pad|>` expanded to grid.prod() // 4 copies in the text, then tokenized."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    image_inputs = Qwen2VLImageProcessorPil.from_pretrained(source_dir)(images, return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    merge = image_inputs.get("merge_size", 2)
    for grid in image_inputs["image_grid_thw"]:
        prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // merge**2), 1)
    input_ids = tokenizer(prompt.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
    mm_token_type_ids = (input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
    return {
        "input_ids": input_ids,
        "pixel_values": image_inputs["pixel_values"],
        "mm_token_type_ids": mm_token_type_ids,
    }


def idefics_reference_inputs(
    source_dir: Path, images: list[list], prompts: list[str], padding_side: str = "left"
) -> dict:
    """transformers' IdeficsProcessor on the same prompts: each prompt split at `<image>` into IDEFICS's
    interleaved list form (text, image, text, ...), with that row's images in order."""
    from transformers import IdeficsProcessor

    processor = IdeficsProcessor.from_pretrained(source_dir)
    processor.tokenizer.padding_side = padding_side
    interleaved = []
    for prompt, row in zip(prompts, images, strict=True):
        pieces = prompt.split("<image>")
        if len(pieces) - 1 != len(row):
            raise ValueError(f"The prompt has {len(pieces) - 1} <image> tokens but {len(row)} images")
        items = [pieces[0]]
        for image, text in zip(row, pieces[1:], strict=True):
            items += [image, text]
        interleaved.append([item for item in items if not isinstance(item, str) or item])
    return processor(text=interleaved, return_tensors="pt")


def fuyu_reference_inputs(source_dir: Path, images: list, prompts: list[str]) -> dict:
    """Fuyu's reference stream and patches, built as transformers' FuyuProcessor documents them: per patch row,
    `|SPEAKER|` x columns + `|NEWLINE|`; then `<s>`, the prompt tokenized without special tokens, `<0x04>`; left
    padding with id 0. Patches come from `FuyuImageProcessorPil` (resize, pad, normalise) cropped to whole patches
    and cut by its own `patchify_image`. (FuyuProcessor itself is not run: in transformers 5.24 its PIL path hands
    torch tensors to the numpy patchify, and it drops the first placeholder token, assuming SentencePiece's `▁`.)"""
    import math

    from transformers import AutoTokenizer, FuyuImageProcessorPil

    image_processor = FuyuImageProcessorPil.from_pretrained(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    P = image_processor.patch_size["height"]
    vocab = tokenizer.get_vocab()
    streams, patches = [], []
    for image, prompt in zip(images, prompts, strict=True):
        out = image_processor(image, return_tensors="np")
        height, width = int(out["image_unpadded_heights"][0][0]), int(out["image_unpadded_widths"][0][0])
        rows, cols = math.ceil(height / P), math.ceil(width / P)
        canvas = out["images"][0][0][:, : rows * P, : cols * P]
        patches.append(torch.as_tensor(image_processor.patchify_image(canvas[None])).reshape(rows * cols, -1))
        stream = ([vocab["|SPEAKER|"]] * cols + [vocab["|NEWLINE|"]]) * rows + [tokenizer.bos_token_id]
        streams.append(stream + tokenizer(prompt, add_special_tokens=False)["input_ids"] + [vocab["<0x04>"]])
    longest = max(map(len, streams))
    input_ids = torch.tensor([[0] * (longest - len(s)) + s for s in streams])
    attention_mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in streams])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.cat(patches)}


def pixel_agreement_for(reference: torch.Tensor, ours: torch.Tensor, std: list[float]) -> tuple[float, float]:
    """Pixel agreement for any layout: images (N, 3, H, W) or per row (B, I, 3, H, W), flattened Qwen2-VL patches
    (N, 3 * T * P * P, channel first), or Fuyu patches (N, P * P * 3, channel last; a scalar std)."""
    reference, ours = (x.flatten(0, 1) if x.dim() == 5 else x for x in (reference, ours))
    if isinstance(std, (int, float)):
        std = [std] * 3
        reference, ours = (x.reshape(x.shape[0], -1, 3).transpose(1, 2).unsqueeze(-1) for x in (reference, ours))
    elif reference.dim() == 2:
        reference, ours = (x.view(x.shape[0], len(std), -1, 1) for x in (reference, ours))
    return pixel_agreement(reference, ours, std)


class OriginalLlavaReference(torch.nn.Module):
    """The original LLaVA forward from transformers' parts: CLIP hidden states of the selected layer (class
    token dropped for `patch`), the projector from the checkpoint, features written over the `<image>`
    embeddings of `LlamaForCausalLM`. The new vocabulary rows are the converter's own choice (random draws),
    so they are copied from the converted model rather than compared."""

    def __init__(self, llava_folder: Path, converted_model, vision_tower: str | Path | None, dtype=torch.float32):
        super().__init__()
        from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaImageProcessorPil

        from .llava import extend_tokenizer

        hf_config = read_json(llava_folder / "config.json")
        tower = resolve_source(vision_tower or hf_config["mm_vision_tower"])
        self.clip = CLIPVisionModel.from_pretrained(tower, dtype=dtype).eval()
        llama_config = LlamaConfig.from_dict(
            {k: v for k, v in hf_config.items() if not k.startswith("mm_") and k != "model_type"}
        )
        self.llama = LlamaForCausalLM.from_pretrained(llava_folder, config=llama_config, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(llava_folder)
        self.image_token_id, _ = extend_tokenizer(self.tokenizer)
        vocab = converted_model.config.text_config.vocab_size
        old = self.llama.get_input_embeddings().weight.shape[0]
        self.llama.resize_token_embeddings(vocab)
        with torch.no_grad():
            self.llama.get_input_embeddings().weight[old:] = converted_model.get_input_embeddings().weight[old:]
            self.llama.get_output_embeddings().weight[old:] = converted_model.get_output_embeddings().weight[old:]
        self.select_layer = hf_config.get("mm_vision_select_layer", -2)
        self.keep_cls = hf_config.get("mm_vision_select_feature", "patch") == "cls_patch"
        image_config = read_json(tower / "preprocessor_config.json")
        self.image_processor = LlavaImageProcessorPil(
            size=image_config["size"],
            crop_size=image_config["crop_size"],
            do_pad=hf_config.get("image_aspect_ratio") == "pad",
        )
        self.generation_config = self.llama.generation_config
        projector_state = _llava_projector_state(llava_folder)
        self.projector_layers = _projector_from_state(
            projector_state, hf_config.get("mm_projector_type", "linear"), dtype
        )

    def process(self, images, prompt: str) -> dict:
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        n = self.clip.config.image_size // self.clip.config.patch_size
        count = n * n + self.keep_cls
        ids = self.tokenizer(prompt)["input_ids"]
        expanded = []
        for token in ids:
            expanded.extend([token] * count if token == self.image_token_id else [token])
        return {"input_ids": torch.tensor([expanded]), "pixel_values": pixel_values}

    def embed(self, input_ids, pixel_values):
        embeds = self.llama.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        hidden = self.clip(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        features = self.projector_layers(hidden if self.keep_cls else hidden[:, 1:])
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        return self.llama(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=8, do_sample=False):
        embeds = self.embed(input_ids, pixel_values)
        new = self.llama.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample
        )
        return torch.cat([input_ids, new], dim=1)


def _llava_projector_state(folder: Path) -> dict[str, torch.Tensor]:
    from .checkpoint_io import iter_shard, weight_files

    return {k: v for path in weight_files(folder) for k, v in iter_shard(path) if k.startswith("model.mm_projector.")}


def _projector_from_state(state: dict, projector_type: str, dtype) -> torch.nn.Module:
    def linear(prefix):
        weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        return layer

    if projector_type == "linear":
        return linear("model.mm_projector").to(dtype)
    return torch.nn.Sequential(linear("model.mm_projector.0"), torch.nn.GELU(), linear("model.mm_projector.2")).to(
        dtype
    )
