"""The Space's functions without a browser: the pattern pictures, streaming answers, errors kept to their column,
multi-turn chats, and memory over many requests."""

from pathlib import Path

import PIL.Image
import pytest

from vlm_patterns.spaces import app, pictures

SPACE = Path(__file__).resolve().parents[1] / "spaces"

EXAMPLE = str(SPACE / "examples" / "color-0.png")


@pytest.fixture(scope="module")
def models():
    return app.ModelSet("embedded", device="cpu")


def run(message, models, histories=None, **settings):
    settings = app.Settings(**{"max_new_tokens": 4, **settings})
    *_, last = app.answer_all(message, histories or {f: [] for f in app.FAMILIES}, models, settings)
    return last


def test_views_count_what_the_processors_count(models):
    image = PIL.Image.open(EXAMPLE)
    view, tokens = pictures.square_input_view(image, 64, 8, pad_to_square=True)
    assert tokens == 64 and max(view.size) == pictures.DISPLAY
    for budget in (4, 16, 64):
        _, qwen_tokens = pictures.native_resolution_view(image, 14, 2, 56 * 56, budget * 28 * 28)
        model, processor = models.get("qwen2_vl")
        history = [{"role": "user", "text": "What color is the square?", "images": [EXAMPLE], "paths": []}]
        _, expected = app.build_inputs(
            model, processor, "qwen2_vl", history, app.Settings(qwen_max_visual_tokens=budget)
        )
        assert [qwen_tokens] == expected
    model, processor = models.get("fuyu")
    _, fuyu_tokens = pictures.patch_rows_view(image, 16, processor.image_processor.size)
    _, expected = app.build_inputs(model, processor, "fuyu", history, app.Settings())
    assert [fuyu_tokens] == expected
    for family in app.FAMILIES:
        picture = pictures.pattern_view(family, *models.get(family), EXAMPLE)
        assert isinstance(picture, PIL.Image.Image) and min(picture.size) > 32


def test_all_four_answer_with_measurements(models):
    displays, stats, views, histories = run({"text": "What color is the square?", "files": [EXAMPLE]}, models)
    for family in app.FAMILIES:
        reply = histories[family][-1]
        assert reply["role"] == "assistant" and reply["text"] and not reply["text"].startswith("⚠️")
        assert "visual tokens: " in stats[family] and "tok" in stats[family]
        assert displays[family][-1] == {"role": "assistant", "content": reply["text"]}
        assert views[family] is not None
    assert "visual tokens: 64" in stats["llava"] and "visual tokens: 16" in stats["flamingo"]


def test_a_failing_column_does_not_stop_the_others(models, monkeypatch):
    original = models.get

    def get(family):
        if family == "fuyu":
            raise RuntimeError("out of memory while loading")
        return original(family)

    monkeypatch.setattr(models, "get", get)
    _, stats, _, histories = run({"text": "How many shapes are there?", "files": [EXAMPLE]}, models)
    assert histories["fuyu"][-1]["text"].startswith("⚠️ RuntimeError: out of memory")
    assert stats["fuyu"] == "failed"
    for family in ("llava", "qwen2_vl", "flamingo"):
        assert not histories[family][-1]["text"].startswith("⚠️")


def test_bad_inputs_get_clear_messages(models, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _, stats, _, histories = run({"text": "What is it?", "files": [str(empty)]}, models)
    for family in app.FAMILIES:
        assert "empty" in histories[family][-1]["text"], histories[family][-1]
    _, stats, _, histories = run({"text": "   ", "files": [EXAMPLE]}, models)
    assert all("Type a question" in s for s in stats.values()) and all(not h for h in histories.values())
    _, stats, _, _ = run({"text": "why " * 400, "files": []}, models)
    assert all("characters" in s for s in stats.values())
    long_question = " ".join(["shape"] * 600)[: app.MAX_PROMPT_CHARACTERS]
    _, _, _, histories = run({"text": long_question, "files": []}, models, max_new_tokens=400)
    assert all("context" in histories[f][-1]["text"] for f in app.FAMILIES)  # 512-token models


def test_multi_turn_and_several_images(models):
    files = [str(SPACE / "examples" / "compare-0.png"), str(SPACE / "examples" / "compare-1.png")]
    _, stats, _, histories = run({"text": "Which image has more shapes, the first or the second?", "files": files},
                                 models)  # fmt: skip
    assert stats["qwen2_vl"].count("+") == 1 and stats["flamingo"].count("+") == 1  # two images each
    assert "+" not in stats["fuyu"] and "first image only (1 more left out)" in stats["fuyu"]  # Fuyu reads one
    _, _, _, histories = run({"text": "How many shapes are there?", "files": []}, models, histories=histories)
    assert all(len(histories[f]) == 4 for f in app.FAMILIES)
    messages = app.conversation_messages(histories["llava"], "llava")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_memory_stays_flat_over_many_requests(models):
    def rss() -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

    message = {"text": "What color is the square?", "files": [EXAMPLE]}
    for _ in range(3):  # warm up: models loaded, allocator pools filled
        run(message, models)
    before = rss()
    for _ in range(15):
        run(message, models)
    assert rss() - before < 40_000  # kB


def test_hub_set_loads_one_model_at_a_time(tmp_path, monkeypatch):
    hub = app.ModelSet("hub", device="cpu", cache_dir=tmp_path)
    assert hub.max_resident == 1
    monkeypatch.setattr(hub, "path", lambda family: app.EMBEDDED[family])  # no network here: stand-ins
    hub.get("llava")
    hub.get("fuyu")
    assert list(hub.loaded) == ["fuyu"]
    with pytest.raises(ValueError, match="model set"):
        app.ModelSet("somewhere")


def test_numbers_count_from_the_submit_and_rates_need_enough_tokens(models):
    import time

    model, processor = models.get("llava")
    history = [{"role": "user", "text": "What color is the square?", "images": [EXAMPLE], "paths": []}]
    *_, answer = app.stream(model, processor, "llava", history, app.Settings(max_new_tokens=4),
                            started=time.perf_counter() - 5.0)  # fmt: skip
    assert answer.time_to_first_token >= 5.0  # what happened before the column started counts
    assert answer.tokens_per_second is None and "tok/s" not in answer.stats()  # 2-4 tokens: no rate
    long = app.Answer(new_tokens=20, seconds=2.0, time_to_first_token=0.1)
    assert long.tokens_per_second == pytest.approx(19 / 1.9) and "tok/s" in long.stats()


def test_words_the_models_never_saw_are_named(models):
    _, stats, _, _ = run({"text": "What colour is the giraffe?", "files": [EXAMPLE]}, models)
    for family in app.FAMILIES:
        assert "never saw the words 'colour', 'giraffe'" in stats[family], stats[family]
    _, stats, _, _ = run({"text": "What color is the square?", "files": [EXAMPLE]}, models)
    assert not any("never saw" in s for s in stats.values())


def test_the_page_says_what_the_models_were_trained_for():
    for family in app.FAMILIES:
        line = app.measured_accuracy(family)
        assert "held-out accuracy: color" in line and "two images" in line or family == "fuyu", line
    assert all(e["answer"] for e in app.EXAMPLES)  # each example shows its expected answer


def test_the_drawn_questions_ask_in_the_task_words_and_every_column_answers(models, tmp_path):
    """spaces/ask_drawn.py, the README's anecdote of pictures drawn as a visitor draws them: its questions use only
    the embedded models' words, each expects one of the task's answers, and each column answers every one."""
    from vlm_patterns.spaces import ask_drawn
    from vlm_patterns.training.synthetic_vqa import ANSWERS, answer_word

    _, processor = models.get("llava")
    answers = {word for words in ANSWERS.values() for word in words}
    for picture, question, expected in ask_drawn.QUESTIONS:
        assert picture in ask_drawn.PICTURES and expected in answers
        assert app.unknown_words(question, processor.tokenizer) == []
    replies = ask_drawn.ask(tmp_path, models)
    assert len(replies) == len(ask_drawn.QUESTIONS) and len(list(tmp_path.glob("*.png"))) == len(ask_drawn.PICTURES)
    for by_family in replies:
        assert set(by_family) == set(app.FAMILIES)
        assert all(answer_word(reply) in answers for reply in by_family.values()), by_family
