"""The toy visual world: cell codes, parser, renderer, captions and the GenEval-style checker."""
from __future__ import annotations

import random

import pytest
import toyworld as tw  # examples/toyworld.py (tests/conftest.py puts examples/ on sys.path)

G = 3


def grid(**cells):
    """grid(c00=('red','circle'), c12=...) -> row-major values of a 3x3 image."""
    values = [0] * (G * G)
    for name, (color, shape) in cells.items():
        r, c = int(name[1]), int(name[2])
        values[r * G + c] = tw.cell_value(color, shape)
    return values


def test_cell_values_round_trip_and_parser_positions():
    seen = set()
    for color in tw.COLORS:
        for shape in tw.SHAPES:
            v = tw.cell_value(color, shape)
            assert tw.cell_object(v) == (color, shape)
            seen.add(v)
    assert seen == set(range(1, tw.NUM_VALUES)) and tw.cell_object(0) is None
    dets = tw.parse_image(grid(c02=("red", "circle"), c21=("blue", "square")), G)
    assert dets == [tw.Detection("red", "circle", 0, 2), tw.Detection("blue", "square", 2, 1)]
    with pytest.raises(ValueError, match="9 cells"):
        tw.parse_image([0] * 8, G)


def test_checker_on_hand_built_images():
    img = grid(c00=("red", "circle"), c01=("green", "circle"), c22=("blue", "square"))
    assert tw.check("a circle", img, G) and not tw.check("a triangle", img, G)
    assert tw.check("a green circle", img, G) and not tw.check("a blue circle", img, G)
    assert tw.check("two circles", img, G) and not tw.check("three circles", img, G)
    assert not tw.check("two squares", img, G)  # exactly two, not at least
    assert tw.check("a circle and a square", img, G) and not tw.check("a circle and a triangle", img, G)
    assert tw.check("a circle left of a square", img, G) and tw.check("a circle above a square", img, G)
    assert not tw.check("a circle right of a square", img, G) and not tw.check("a circle below a square", img, G)
    assert tw.check("a red circle and a blue square", img, G)
    assert not tw.check("a blue circle and a red square", img, G)  # colours bound to the wrong objects


def test_checker_rejects_clutter_beyond_two_extra_objects():
    three = grid(c00=("red", "circle"), c01=("green", "square"), c02=("blue", "square"))
    four = grid(c00=("red", "circle"), c01=("green", "square"), c02=("blue", "square"), c10=("red", "triangle"))
    assert tw.check("a circle", three, G) and not tw.check("a circle", four, G)  # 1 named + 3 extra
    assert tw.holds("a circle", four, G)  # still a true statement about the image
    assert tw.check("a circle and a square", four, G)  # 2 named + 2 extra
    assert tw.check("two squares", four, G)
    full = [tw.cell_value("red", "circle")] * 9
    assert tw.holds("a red circle", full, G) and not tw.check("a red circle", full, G)


def test_captions_parse_back_for_every_spec():
    n = 0
    for task in tw.TASKS:
        for spec in tw.all_specs(task):
            assert tw.parse_caption(spec.caption()) == spec
            assert tw.parse_caption(spec.caption() + " <boi>") == spec
            n += 1
    assert n == 3 + 9 + 6 + 6 + 24 + 54
    with pytest.raises(ValueError, match="cannot parse"):
        tw.parse_caption("a purple circle")


def test_true_specs_equals_brute_force_and_scenes_satisfy_their_caption():
    rng = random.Random(0)
    for _ in range(60):
        values = tw.random_scene(rng, G)
        enumerated = tw.true_specs(values, G)
        for task in tw.TASKS:
            brute = {s for s in tw.all_specs(task) if tw.holds(s, values, G)}
            assert set(enumerated[task]) == brute, task
    for _ in range(60):
        spec = tw.sample_spec(rng)
        assert tw.check(spec, tw.scene_for(spec, rng, G), G)


def test_counting_scenes_hold_several_objects_of_one_shape():
    rng = random.Random(1)
    for _ in range(40):
        dets = tw.parse_image(tw.random_scene(rng, G, counting_scenes=1.0), G)
        top = max(sum(d.shape == s for d in dets) for s in tw.SHAPES)
        assert 2 <= top <= 4 and len(dets) - top <= 1


def test_geneval_scores_are_task_means():
    img_yes = grid(c00=("red", "circle"))
    specs = [tw.parse_caption("a circle"), tw.parse_caption("a circle"), tw.parse_caption("two circles")]
    scores = tw.geneval_scores(specs, [img_yes, [0] * 9, img_yes], G)
    assert scores["single_object"] == 0.5 and scores["counting"] == 0.0 and scores["overall"] == 0.25


def test_render_draws_colours_in_the_right_cells():
    img = tw.render(grid(c00=("red", "square"), c12=("blue", "circle")), G, cell_px=20)
    assert img.size == (60, 60)
    assert img.getpixel((10, 10)) == tw.RGB["red"]
    assert img.getpixel((50, 30)) == tw.RGB["blue"]
    assert img.getpixel((30, 50)) == (250, 250, 250)


def test_tokenizer_and_layout_of_the_toy_umm():
    model, tok = tw.build_toy_umm(grid_size=G, hidden_size=32, num_heads=2)
    layout = model.config.umm
    assert layout["num_image_tokens"] == 9 and len(layout["image_token_ids"]) == tw.NUM_VALUES
    ids = tok("a red circle <boi>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "red", "circle", "<boi>"]
    assert tok.unk_token_id not in tok(tw.INSTRUCTION + "three squares", add_special_tokens=False)["input_ids"]
    assert tw.image_values([layout["image_token_ids"][v] for v in (0, 5, 9)], layout) == [0, 5, 9]
    with pytest.raises(ValueError, match="not an image token"):
        tw.image_values([ids[0]], layout)
