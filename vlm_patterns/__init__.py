"""vlm-patterns: the three vision-language architecture patterns as four Hugging Face-native model families.

`import vlm_patterns` registers the families with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor, AutoImageProcessor). The library lives in subpackages:
`vlm_patterns.modeling` (configs and models), `vlm_patterns.processing` (processors), `vlm_patterns.conversion`
(public checkpoints <-> ours, parity), `vlm_patterns.training` (the synthetic task), and, on top, this package's
own modules: `families` (the registry), `cli`, `inference`, `publishing`.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Installed, the subpackages sit inside this folder. In a clone they are the repository's top-level folders
# (modeling/, processing/, ...), which the package reaches through its path, as an installed copy does.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "modeling").is_dir() and (_HERE.parent / "modeling" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821  (a package's __path__)

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Register each family's config, models and processors with the Auto classes; idempotent. The classes also
    register themselves for `trust_remote_code`, so `save_pretrained` output loads where this package is absent."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .families import FAMILIES

    for family in FAMILIES.values():
        config_class = family.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, family.model_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, family.generation_class, exist_ok=True)
        AutoProcessor.register(config_class, family.processor_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": family.image_processor_class}, exist_ok=True
        )
        config_class.register_for_auto_class()
        family.model_class.register_for_auto_class("AutoModel")
        family.generation_class.register_for_auto_class("AutoModelForImageTextToText")
        family.processor_class.register_for_auto_class("AutoProcessor")
        family.image_processor_class.register_for_auto_class("AutoImageProcessor")


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registration needs torch and transformers (seconds to import), which `vlm-patterns --help` and the other
    light commands never touch. So when transformers is not loaded yet, registration runs right after it is: the
    Auto classes know our families before anyone can call them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        self.spec = importlib.util.find_spec("transformers")
        if self.spec is None:
            return None
        self.loader = self.spec.loader
        self.spec.loader = self
        return self.spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        register_auto_classes()


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
