"""Bulk datasets without Ray: records are validated, grouped by base, keyed deterministically."""

import pytest

from fisedit.service.bulk_records import (
    BulkDefaults,
    BulkLayout,
    input_format,
    parse_records,
    read_json_records,
)

DEFAULTS = BulkDefaults(steps=3)


def _ours(id="r1", **fields):
    return {
        "id": id,
        "base_prompt": "a cat on a bench",
        "seed": 1,
        "variations": ["a dog"],
    } | fields


def test_our_records_with_the_same_base_share_one_group_and_chains_keep_their_own():
    records = [
        _ours("a", variations=["a dog on a bench", {"prompt": "a fox", "mask": "masks/m.png"}]),
        _ours("b", variations=["a bird on a bench"]),
        _ours("c", variations=["a red cat", "a red cat at night"], chain=True),
        _ours("d", seed=2),
    ]

    parsed = parse_records(records, "run1", DEFAULTS)

    assert parsed.failed == []
    shared, chain, other_seed = parsed.groups
    assert [(_position(v.id), v.prompt, v.record_id, v.index) for v in shared.variations] == [
        ("v0", "a dog on a bench", "a", 0),
        ("v1", "a fox", "a", 1),
        ("v0", "a bird on a bench", "b", 0),
    ]
    assert shared.variations[1].mask == "masks/m.png"
    assert chain.chain and [_position(v.id) for v in chain.variations] == ["v0", "v1"]
    assert other_seed.generation.seed == 2 and shared.generation.steps == 3
    assert len({shared.id, chain.id, other_seed.id}) == 3
    # Ids come from the input alone, so a second read of it names the same groups.
    assert _ids(parse_records(records, "run1", DEFAULTS)) == _ids(parsed)


def _position(variation_id: str) -> str:
    position, digest = variation_id.split("-")
    assert len(digest) == 8
    return position


def _ids(parsed) -> list[tuple[str, list[str]]]:
    return [(g.id, [v.id for v in g.variations]) for g in parsed.groups]


def test_ids_change_with_what_made_them_so_a_rerun_of_a_changed_input_recomputes_it():
    records = [
        _ours("a", variations=["a dog", "a fox"]),
        _ours("c", variations=["a red cat", "a red cat at night"], chain=True),
        _ours("b", variations=["a bird"]),  # the same base as a: one group
    ]
    (shared, chain) = _ids(parse_records(records, "r", DEFAULTS))

    # A variation's prompt: its id alone, and every later one's in a chain.
    records[0]["variations"][0] = "a wolf"
    records[1]["variations"][0] = "a blue cat"
    (shared2, chain2) = _ids(parse_records(records, "r", DEFAULTS))
    assert shared2[0] == shared[0] and shared2[1][1:] == shared[1][1:]
    assert shared2[1][0] != shared[1][0]
    assert chain2[0] == chain[0] and set(chain2[1]).isdisjoint(chain[1])
    # A variation gone from one record: another record's keys stay.
    records[0]["variations"].pop()
    assert _ids(parse_records(records, "r", DEFAULTS))[0][1][-1] == shared[1][-1]
    # The base, or what makes the images (the model and the engine settings): the group's.
    records[0]["base_prompt"] = "a cat on a sofa"
    assert _ids(parse_records(records, "r", DEFAULTS))[0][0] != shared[0]
    other_model = _ids(parse_records(records, "r", DEFAULTS, producer="another model"))
    assert {g for g, _ in other_model}.isdisjoint({shared[0], chain[0]})


def test_a_record_with_the_id_of_an_earlier_one_fails_and_does_not_join_its_chain():
    records = [_ours("a", chain=True), _ours("a", variations=["a fox"], chain=True)]
    records.append({"input": "a house", "output": "a red house"})  # record id row2
    records.append(_ours("row2", variations=["a wolf"]))  # ours: another record's id

    parsed = parse_records(records, "r", DEFAULTS)

    assert [[v.prompt for v in g.variations] for g in parsed.groups] == [
        ["a dog"], ["a red house"], ["a wolf"]
    ]  # fmt: skip
    (failed,) = parsed.failed
    assert failed.row == 1 and failed.error == "malformed record: id: 'a' is the id of row 0 too"


def test_integral_float_seeds_and_steps_are_integers_and_others_fail():
    # As pandas writes an integer column with a gap to Parquet.
    parsed = parse_records([_ours(seed=3.0, steps=7.0), _ours("b", seed=3.5)], "r", DEFAULTS)

    (group,) = parsed.groups
    assert (group.generation.seed, group.generation.steps) == (3, 7)
    assert "seed: Input should be a valid integer" in parsed.failed[0].error


def test_record_settings_override_the_defaults():
    (group,) = parse_records([_ours(steps=7, guidance=3.0, scheduler="ddim")], "r", DEFAULTS).groups
    assert (group.generation.steps, group.generation.guidance) == (7, 3.0)
    assert group.generation.scheduler == "ddim"


def test_instruct_pix2pix_rows_sharing_input_and_seed_form_one_group():
    records = [
        {"input": "a house", "edit": "make it snowy", "output": "a snowy house"},
        {"input": "a house", "edit": "add a tree", "output": "a house with a tree"},
        {"input": "a house", "edit": "paint it", "output": "a red house", "seed": 5},
    ]

    house, house_seed5 = parse_records(records, "r", DEFAULTS).groups

    assert [(v.prompt, v.edit, v.row) for v in house.variations] == [
        ("a snowy house", "make it snowy", 0),
        ("a house with a tree", "add a tree", 1),
    ]
    assert house.generation.prompt == "a house" and house.generation.seed == 0
    assert house_seed5.generation.seed == 5


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"id": "x", "seed": 1, "variations": ["a dog"]}, "base_prompt: Field required"),
        (_ours(seed="3"), "seed: Input should be a valid integer"),
        (_ours(variations="a dog"), "variations: Input should be a valid list"),
        (_ours(variations=[]), "variations: List should have at least 1 item"),
        (_ours(base_prompt="   "), "base_prompt: Value error, prompt must contain text"),
        (_ours(variations=["x" * 2001]), "variations.0.prompt: String should have at most 2000"),
        (_ours(variations=[{"prompt": "a", "mask": "../escape.png"}]), "'..' segment"),
        ({"input": "a house", "edit": "snow"}, "output: Field required"),
        ({"caption": "a house"}, "neither format"),
        (ValueError("line is not JSON (Expecting value)"), "line is not JSON"),
        (["a", "list"], "expected a JSON object, got list"),
    ],
)
def test_malformed_records_fail_with_the_reason_and_the_others_are_kept(record, reason):
    parsed = parse_records([_ours("good"), record], "run1", DEFAULTS)

    assert [v.record_id for g in parsed.groups for v in g.variations] == ["good"]
    (failed,) = parsed.failed
    assert failed.status == "failed" and failed.row == 1 and failed.run == "run1"
    assert failed.error.startswith("malformed record: ") and reason in failed.error


def test_jsonl_lines_that_are_not_json_become_failures_in_place():
    text = '{"a": 1}\n\nnot json\n{"b": 2}\n'
    records = list(read_json_records(text))
    assert records[0] == {"a": 1} and records[2] == {"b": 2}
    assert isinstance(records[1], ValueError)


def test_json_records_are_lines_ended_by_newlines_only_or_a_json_array():
    # U+2028, U+0085 inside strings (json.dumps writes them so with ensure_ascii=False),
    # Windows line ends, and a byte order mark first.
    text = '\ufeff{"p": "a\u2028b"}\r\n{"p": "c\u0085d"}\r\n'
    assert list(read_json_records(text)) == [{"p": "a\u2028b"}, {"p": "c\u0085d"}]
    assert list(read_json_records(' [{"p": 1}, {"p": 2}]\n')) == [{"p": 1}, {"p": 2}]
    with pytest.raises(ValueError, match="not a JSON array of records"):
        list(read_json_records('[{"p": 1},'))


def test_layout_keys_and_run_ids():
    layout = BulkLayout(tenant="acme", run="run-7")
    assert layout.manifest_key == "tenants/acme/bulk/run-7/manifest.parquet"
    assert layout.image_key("g1", "v0") == "tenants/acme/bulk/run-7/g1/v0.png"
    assert layout.mask_key("g1", "v0") == "tenants/acme/bulk/run-7/g1/v0.mask.png"
    assert layout.row_key("g1", "v0") == "tenants/acme/bulk/run-7/g1/v0.json"
    with pytest.raises(ValueError, match="one key segment"):
        BulkLayout(tenant="acme", run="a/b")
    with pytest.raises(ValueError, match="'..' segment"):
        BulkLayout(tenant="acme", run="..")


def test_input_format_follows_the_file_name():
    assert input_format("s3://bucket/in/data.jsonl") == "jsonl"
    assert input_format("data.parquet") == "parquet"
    with pytest.raises(ValueError, match="unknown input format '.csv'"):
        input_format("data.csv")
