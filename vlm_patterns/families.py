"""The family registry: what is said about each of the four families, said once.

Everything else (the command line, the Space, publishing, benchmarks, the Auto registration) reads these records
instead of keeping its own table. Two facts live beside the code they describe and are read from there: which
parameters are the vision encoder and the connector (class attributes of each model, next to the modules they
name), and how many images one prompt may hold (an attribute of each processor, which enforces it). Visual tokens
per image are counted by the processors (`_get_num_multimodal_tokens`, transformers' convention).

Nothing here imports torch: `vlm-patterns --help` reads this module.
"""

import importlib
from dataclasses import dataclass, field


def resolve(path: str):
    """ "module:attribute", the module relative to this package's namespace (e.g. "conversion.llava:convert_llava")."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)


@dataclass(frozen=True)
class SourceLayout:
    """A public checkpoint layout our converter reads (and, where `exporter` is set, writes back)."""

    name: str  # as the command line names it: `vlm-patterns convert NAME ...`
    converter: str  # "module:function" converting a folder or Hub id of this layout into ours
    tiny: str  # "module:function" writing a tiny random checkpoint in this layout (tests, demos)
    verifier: str  # "module:function" comparing a conversion with transformers' reference on the same weights
    exporter: str | None = None  # "module:function" writing ours back into this layout
    checkpoints: dict[str, str] = field(default_factory=dict)  # public checkpoints in this layout -> their licence
    weights: str = ""  # whose weights, where a family reads several layouts

    def convert(self, *args, **kwargs):
        return resolve(self.converter)(*args, **kwargs)

    def export(self, *args, **kwargs):
        if self.exporter is None:
            raise NotImplementedError(f"{self.name} checkpoints are converted, not exported")
        return resolve(self.exporter)(*args, **kwargs)

    def build_tiny(self, *args, **kwargs):
        return resolve(self.tiny)(*args, **kwargs)

    def verify(self, *args, **kwargs):
        return resolve(self.verifier)(*args, **kwargs)


@dataclass(frozen=True)
class Family:
    name: str  # model_type `<name>_pattern`; files configuration_<name>.py, modeling_<name>.py, processing_<name>.py
    class_prefix: str  # classes <prefix>PatternConfig, <prefix>PatternForConditionalGeneration, ...
    title: str
    pattern: str  # the architecture pattern, in a few words
    idea: str  # how it gives the language model eyes, in one sentence
    layouts: tuple[SourceLayout, ...]
    showcase: tuple[str, str]  # (layout, Hub id): the public checkpoint the Space's `hub` model set loads
    picture_legend: str  # what the Space's picture of how this family sees an image shows

    @property
    def model_type(self) -> str:
        return f"{self.name}_pattern"

    def layout(self, name: str) -> SourceLayout:
        return next(layout for layout in self.layouts if layout.name == name)

    def _class(self, folder: str, module: str, suffix: str) -> type:
        package = importlib.import_module(f"{__package__}.{folder}.{module}_{self.name}")
        return getattr(package, f"{self.class_prefix}Pattern{suffix}")

    @property
    def config_class(self) -> type:
        return self._class("modeling", "configuration", "Config")

    @property
    def model_class(self) -> type:
        return self._class("modeling", "modeling", "Model")

    @property
    def generation_class(self) -> type:
        return self._class("modeling", "modeling", "ForConditionalGeneration")

    @property
    def processor_class(self) -> type:
        return self._class("processing", "processing", "Processor")

    @property
    def image_processor_class(self) -> type:
        return self._class("processing", "image_processing", "ImageProcessor")

    @property
    def images_per_prompt(self) -> int | None:
        """The most images one prompt may hold (None: any number)."""
        return self.processor_class.max_images_per_prompt

    @property
    def vision_encoder(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the vision encoder (empty for Fuyu, which has none)."""
        return self.generation_class.vision_encoder_prefixes

    @property
    def connector(self) -> tuple[str, ...]:
        """Parameter-name prefixes of what joins vision to language (trained by every freezing strategy)."""
        return self.generation_class.connector_prefixes


LLAVA = Family(
    name="llava",
    class_prefix="Llava",
    title="LLaVA",
    pattern="projection",
    idea="CLIP ViT features, projected by an MLP, replace the `<image>` placeholder embeddings of the language model",
    layouts=(
        SourceLayout(
            "llava",
            "conversion.llava:convert_llava",
            "conversion.tiny:build_tiny_llava_hf",
            "conversion.verify:verify_llava",
            "conversion.llava:export_llava",
            checkpoints={
                "llava-hf/llava-1.5-7b-hf": "llama2",
                "liuhaotian/llava-v1.5-7b": "llama2",
                "llava-hf/llava-interleave-qwen-0.5b-hf": "other",
            },
        ),
    ),  # fmt: skip
    showcase=("llava", "llava-hf/llava-1.5-7b-hf"),
    picture_legend="The fixed square the ViT reads (padded to a square first); grey lines: its patches, one visual "
    "token each.",
)
QWEN2_VL = Family(
    name="qwen2_vl",
    class_prefix="Qwen2VL",
    title="Qwen2-VL",
    pattern="projection at native resolution",
    idea="a ViT reads each image at its own size (2D RoPE, 2x2 PatchMerger) and feeds a language model with "
    "multimodal RoPE",
    layouts=(
        SourceLayout(
            "qwen2_vl",
            "conversion.qwen2_vl:convert_qwen2_vl",
            "conversion.tiny:build_tiny_qwen2_vl",
            "conversion.verify:verify_qwen2_vl",
            "conversion.qwen2_vl:export_qwen2_vl",
            checkpoints={"Qwen/Qwen2-VL-2B-Instruct": "apache-2.0", "Qwen/Qwen2-VL-7B-Instruct": "apache-2.0"},
        ),
    ),  # fmt: skip
    showcase=("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
    picture_legend="The image at about its own size (`smart_resize`); grey lines: 14-pixel patches; thick yellow "
    "lines: each 2 x 2 group the PatchMerger joins into one visual token.",
)
FUYU = Family(
    name="fuyu",
    class_prefix="Fuyu",
    title="Fuyu",
    pattern="early fusion",
    idea="raw image patches pass one Linear layer into the decoder's token stream, no vision encoder",
    layouts=(
        SourceLayout(
            "fuyu",
            "conversion.fuyu:convert_fuyu",
            "conversion.tiny:build_tiny_fuyu",
            "conversion.verify:verify_fuyu",
            "conversion.fuyu:export_fuyu",
            checkpoints={"adept/fuyu-8b": "cc-by-nc-4.0"},
        ),
    ),  # fmt: skip
    showcase=("fuyu", "adept/fuyu-8b"),
    picture_legend="Raw patches row by row, no encoder: each patch is one token; red bars: the newline token closing "
    "each row.",
)
FLAMINGO = Family(
    name="flamingo",
    class_prefix="Flamingo",
    title="Flamingo",
    pattern="cross-attention",
    idea="a Perceiver Resampler turns each image into a fixed set of latents that the language model reads through "
    "tanh-gated cross-attention layers",
    layouts=(
        SourceLayout(
            "idefics",
            "conversion.idefics:convert_idefics",
            "conversion.tiny:build_tiny_idefics",
            "conversion.verify:verify_idefics",
            "conversion.idefics:export_idefics",
            checkpoints={"HuggingFaceM4/idefics-9b": "other", "HuggingFaceM4/idefics-9b-instruct": "other"},
            weights="IDEFICS",
        ),
        SourceLayout(
            "openflamingo",
            "conversion.openflamingo:convert_openflamingo",
            "conversion.tiny:build_tiny_open_flamingo",
            "conversion.verify:verify_openflamingo",
            weights="OpenFlamingo",
        ),
    ),  # fmt: skip
    showcase=("idefics", "HuggingFaceM4/idefics-9b-instruct"),
    picture_legend="Left: the resampler's latents for the image (rows: latents, columns: channels; blue low, orange "
    "high). Right: per gated layer, tanh of the gate on cross-attention (blue) and on the feed-forward (orange); "
    "0 means closed.",
)

# In the order the Space shows them: projection, projection at native resolution, early fusion, cross-attention.
FAMILIES: dict[str, Family] = {family.name: family for family in (LLAVA, QWEN2_VL, FUYU, FLAMINGO)}
SOURCE_LAYOUTS: dict[str, tuple[Family, SourceLayout]] = {
    layout.name: (family, layout) for family in FAMILIES.values() for layout in family.layouts
}


def family_of(model_type_or_name: str) -> Family:
    """The family of a name ("llava"), a model_type ("llava_pattern") or a source layout ("idefics")."""
    name = model_type_or_name.removesuffix("_pattern")
    if name in FAMILIES:
        return FAMILIES[name]
    if name in SOURCE_LAYOUTS:
        return SOURCE_LAYOUTS[name][0]
    raise ValueError(f"Unknown family {model_type_or_name!r}; the families are {', '.join(FAMILIES)}")


def licence_of(checkpoint: str) -> str:
    """The licence of a public checkpoint our converters are made for; "other" for anything else (see its source)."""
    for _, layout in SOURCE_LAYOUTS.values():
        if checkpoint in layout.checkpoints:
            return layout.checkpoints[checkpoint]
    return "other"
