"""Bulk datasets without Ray: records are validated, grouped by base, keyed deterministically."""

import pytest

from fisedit.service.bulk_records import (
    BulkDefaults,
    BulkLayout,
    input_format,
    parse_records,
    read_jsonl,
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
    assert [(v.id, v.prompt, v.record_id, v.index) for v in shared.variations] == [
        ("v0", "a dog on a bench", "a", 0),
        ("v1", "a fox", "a", 1),
        ("v2", "a bird on a bench", "b", 0),
    ]
    assert shared.variations[1].mask == "masks/m.png"
    assert chain.chain and [v.id for v in chain.variations] == ["v0", "v1"]
    assert other_seed.generation.seed == 2 and shared.generation.steps == 3
    assert len({shared.id, chain.id, other_seed.id}) == 3
    # Ids come from the base alone, so a second read of the same input names the same groups.
    assert [g.id for g in parse_records(records, "run1", DEFAULTS).groups] == [
        g.id for g in parsed.groups
    ]


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
    records = list(read_jsonl(text))
    assert records[0] == {"a": 1} and records[2] == {"b": 2}
    assert isinstance(records[1], ValueError)


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
