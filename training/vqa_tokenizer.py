"""A word-level tokenizer for the synthetic task: one id per word of its questions, answers and chat formats.

Built with `tokenizers` (WordLevel model, whitespace + punctuation pre-tokenizer) and saved with every trained
checkpoint. The special tokens of all four families are in one vocabulary; each family's copy names its own
BOS/EOS/padding tokens, as its public tokenizer does.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .recipes import recipe
from .synthetic_vqa import vocabulary

SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<s>", "</s>",
    "<image>", "<|endofchunk|>",  # LLaVA and Flamingo
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",  # Qwen2-VL
    "|SPEAKER|", "|NEWLINE|", "|ENDOFTEXT|", "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>",  # Fuyu
]  # fmt: skip

# Words the families' chat formats add around a question (LLaVA's "USER:", Qwen's default system turn, ...).
CHAT_WORDS = ["USER", "ASSISTANT", "User", "Assistant", "system", "user", "assistant", "You", "are", "a", "helpful",
              ":", "."]  # fmt: skip


def build_vqa_tokenizer(family: str) -> PreTrainedTokenizerFast:
    recipe_of_family = recipe(family)
    bos, eos, pad = (recipe_of_family.TOKENS[k] for k in ("bos", "eos", "pad"))  # as the family's public tokenizer
    words = sorted(set(vocabulary()) | set(CHAT_WORDS))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # Words joined by spaces, punctuation attached (WordPiece's clean-up attaches ",", "." and "?", not ":", which a
    # position reply ends with: "... circle four: left").
    tokenizer.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    if bos is not None and not getattr(recipe_of_family, "PROCESSOR_PLACES_BOS", False):
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    special = dict(eos_token=eos, pad_token=pad, unk_token="<unk>") | ({"bos_token": bos} if bos else {})
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
