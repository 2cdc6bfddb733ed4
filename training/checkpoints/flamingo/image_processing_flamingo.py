"""Flamingo's image processor: every image resized to the vision tower's square input (224 x 224, bicubic),
rescaled and normalised with CLIP's statistics, as IDEFICS does. OpenFlamingo's open_clip transform (resize
the shortest edge, centre-crop) is the same class with `size={"shortest_edge": 224}` and `do_center_crop`.
"""

from .image_processing_llava import LlavaPatternImageProcessor


class FlamingoPatternImageProcessor(LlavaPatternImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        do_center_crop: bool = False,
        crop_size: dict[str, int] | None = None,
        **kwargs,
    ):
        """Options as `LlavaPatternImageProcessor`; the defaults resize straight to 224 x 224 without a crop."""
        super().__init__(
            size=size if size is not None else {"height": 224, "width": 224},
            do_center_crop=do_center_crop,
            crop_size=crop_size if crop_size is not None else {"height": 224, "width": 224},
            **kwargs,
        )
