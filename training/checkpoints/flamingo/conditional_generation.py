"""The conditional-generation shell every family shares: its base model, an LM head over the last hidden states,
the accessors transformers' tooling expects, `logits_to_keep`, and the next-token loss. Each family names only its
base model class, its output class and which positions the loss ignores.

Its `forward` is the base model's plus `labels` and `logits_to_keep`, and says so in its signature: transformers'
`generate`, Trainer and peft read the argument names from `inspect.signature(model.forward)`, so each family's
class gets the signature of its own base model's `forward`, written once, there.
"""

import copy
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from .pattern_pretrained import PatternPreTrainedModel
from .static_generation import DecoderPool, compile_for_inference, static_generate


@dataclass
class CausalLMOutputWithImages(CausalLMOutputWithPast):
    image_hidden_states: torch.Tensor | None = None


def head_parameters() -> list[inspect.Parameter]:
    """What the conditional-generation forward adds to its base model's arguments."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [
        inspect.Parameter("labels", keyword, default=None, annotation=torch.LongTensor | None),
        inspect.Parameter("logits_to_keep", keyword, default=0, annotation=int | torch.Tensor),
    ]


def forward_signature(base_forward) -> inspect.Signature:
    """The base model's `forward` signature with `labels` and `logits_to_keep` before its `**kwargs`."""
    parameters = list(inspect.signature(base_forward).parameters.values())
    *named, rest = parameters
    if rest.kind != inspect.Parameter.VAR_KEYWORD or rest.name != "kwargs":
        raise TypeError(f"{base_forward.__qualname__} must end in **kwargs (attention kernel options pass through)")
    return inspect.Signature([*named, *head_parameters(), rest])


class PatternForConditionalGeneration(PatternPreTrainedModel, GenerationMixin):
    """Put it first among a family's bases, before the family's PreTrainedModel: `class XForConditionalGeneration(
    PatternForConditionalGeneration, XPreTrainedModel)`, so that GenerationMixin stays after PreTrainedModel."""

    base_model_class: ClassVar[type]
    output_class: ClassVar[type] = CausalLMOutputWithPast
    # Parameter-name prefixes of the vision encoder and of the connector (what joins vision to language): what
    # freezing strategies and LoRA's `modules_to_save` act on.
    vision_encoder_prefixes: ClassVar[tuple[str, ...]] = ()
    connector_prefixes: ClassVar[tuple[str, ...]] = ()
    # Whether each visual token is a position of the sequence (projection, early fusion) or is only read by
    # cross-attention beside it (Flamingo): what a count of the prompt's tokens must add for the images.
    visual_tokens_in_sequence: ClassVar[bool] = True
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "base_model_class" in cls.__dict__:  # a family's class: its forward takes its base model's arguments
            signature = forward_signature(cls.base_model_class.forward)

            def forward(self, *args, **kwargs):
                return PatternForConditionalGeneration.forward(self, *args, **kwargs)

            forward.__signature__ = signature
            forward.__doc__ = PatternForConditionalGeneration.forward.__doc__
            forward.__qualname__ = f"{cls.__qualname__}.forward"
            cls.forward = forward
            # Positional arguments, in order, as the signature names them (what `forward` maps them to).
            cls.argument_names = tuple(signature.parameters)[1:-1]

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def generate(self, inputs=None, generation_config=None, static_decode: bool | None = None, **kwargs):
        """transformers' `generate`; with `static_decode=True` (or `static_decode` set in the generation config),
        the static decode path (static_generation.py): the same greedy tokens, far less overhead per step, a CUDA
        graph on GPUs. It takes `streamer`, `tokenizer` (for `stop_strings`), `generator` (a seeded
        `torch.Generator` for sampling), `step_mode` ("eager", "graph" or "compiled"; default: graph on CUDA,
        eager elsewhere) and `compile_prompt` (the prompt pass compiled too, see `compiled_prompt_pass`); options
        it does not implement are refused by name."""
        config = generation_config if generation_config is not None else self.generation_config
        if static_decode is None:
            static_decode = bool(getattr(config, "static_decode", False))  # an extra attribute of the config
        if not static_decode:
            return super().generate(inputs, generation_config, **kwargs)
        self.fit_to_context(inputs, generation_config, kwargs)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        streamer, tokenizer, generator, step_mode, compile_prompt = (
            kwargs.pop("streamer", None),
            kwargs.pop("tokenizer", None),
            kwargs.pop("generator", None),
            kwargs.pop("step_mode", None),
            kwargs.pop("compile_prompt", False),
        )
        # `update` only sets attributes, so a shallow copy keeps the model's config as it was (a deep copy of a
        # generation config costs a millisecond, as much as a whole decode step of the shipped models).
        config = copy.copy(config)
        model_inputs = config.update(**kwargs)
        with torch.inference_mode():
            sequences = static_generate(self, model_inputs, config, streamer=streamer, tokenizer=tokenizer,
                                        generator=generator, step_mode=step_mode, compile_prompt=compile_prompt)  # fmt: skip
        return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences

    def static_decoders(self) -> DecoderPool:
        """This model's static-decode buffers (and CUDA graphs) by request shape, kept between calls."""
        if "_static_decoders" not in self.__dict__:
            self.__dict__["_static_decoders"] = DecoderPool()
        return self.__dict__["_static_decoders"]

    def compiled_prompt_pass(self):
        """This model's `forward` compiled for the static path's prompt pass (`generate(..., static_decode=True,
        compile_prompt=True)`), kept between calls. It compiles for the first prompt it meets, then once more
        with symbolic lengths for other prompt lengths; Qwen2-VL compiles again for each new image grid (its
        per-image attention is laid out from the grid on the host). Up to torch's recompile limit (8 kinds of
        prompt), then later new kinds run uncompiled.
        Its wrapper is C++ too (`cpp_wrapper`): a prompt pass calls a hundred kernels or more, and the Python
        wrapper's cost per call was a tenth of the shipped models' compiled prompt pass (0.8 of 6.6 ms, measured)."""
        if "_compiled_prompt_pass" not in self.__dict__:
            compiled = compile_for_inference(self.forward, dynamic=None, cpp_wrapper=True)
            self.__dict__["_compiled_prompt_pass"] = compiled
        return self.__dict__["_compiled_prompt_pass"]

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs)

    def positions_without_targets(self, input_ids, inputs_embeds, labels) -> torch.Tensor | None:
        """(B, T) bool: tokens the model never has to predict: by default the image placeholders, where image
        features go."""
        return self.model.placeholder_mask(input_ids, inputs_embeds)

    def forward(self, *args, **kwargs):
        """The base model's arguments, and `labels` (B, T): next-token targets (-100 and the positions where image
        features go are ignored by the loss); `logits_to_keep`: only the last this many positions' logits (0: all),
        or those it indexes. Returns the family's causal-LM output."""
        # On every step of generation: a plain mapping by name, not `inspect.Signature.bind`.
        if len(args) > len(self.argument_names):
            raise TypeError(f"forward takes at most {len(self.argument_names)} positional arguments")
        arguments = dict(zip(self.argument_names[: len(args)], args, strict=True))
        if any(name in kwargs for name in arguments):  # (not `keys().isdisjoint`, which torch.compile cannot trace)
            raise TypeError(f"forward got several values for {sorted(arguments.keys() & kwargs.keys())}")
        arguments.update(kwargs)
        labels, logits_to_keep = arguments.pop("labels", None), arguments.pop("logits_to_keep", 0)
        # Trainer passes the batch's token count so that gradient accumulation averages over tokens, not steps.
        num_items_in_batch = arguments.pop("num_items_in_batch", None)
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 1:
            # Generation's prompt pass: the last layer need not run its other positions (`only_last_position`).
            arguments.setdefault("last_position_only", True)
        outputs = self.model(**arguments)  # names the base model does not take go to its `**kwargs`
        input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        return self.language_modeling(outputs, input_ids, inputs_embeds, labels, logits_to_keep, num_items_in_batch)

    def language_modeling(self, outputs, input_ids, inputs_embeds, labels, logits_to_keep, num_items_in_batch=None):
        """The base model's outputs -> logits (of the last `logits_to_keep` positions, or those indexed by it), the
        loss when `labels` (B, T) are given (-100 and `positions_without_targets` ignored), the family's output."""
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            ignored = self.positions_without_targets(input_ids, inputs_embeds, labels)
            if ignored is not None:
                labels = labels.masked_fill(ignored.to(labels.device), -100)
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        extras = {name: getattr(outputs, name) for name in self.output_class.__dataclass_fields__
                  if name not in CausalLMOutputWithPast.__dataclass_fields__}  # fmt: skip
        return self.output_class(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states, **extras
        )
