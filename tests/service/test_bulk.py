"""Bulk editing on a real local Ray cluster (CPU, tiny model), into a local directory and moto S3.

One uninterrupted run over a JSONL file of 30 groups in both formats is the reference; the same
records as Parquet on S3 are run in two attempts (the first one's driver is killed part way) and
must end with the same outputs.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from polling import wait_until
from pydantic import ValidationError

from fisedit.engine.config import EditConfig, EngineConfig, GenerationParams
from fisedit.engine.session import Engine
from fisedit.service.bulk import (
    BulkOptions,
    GroupEditor,
    _actor_resources,
    bulk_settings,
    producer,
    read_manifest,
    run_bulk,
)
from fisedit.service.bulk_records import (
    BulkDefaults,
    BulkGroup,
    BulkLayout,
    GroupVariation,
    parse_records,
)
from fisedit.service.commands import add_bulk_arguments
from fisedit.service.config import ServiceConfig, StoreConfig

BUCKET = "fisedit-test"
REPO = str(Path(__file__).resolve().parents[2])
ENGINE = EngineConfig(progress=False, edit=EditConfig(mask_steps=1))
DEFAULTS = BulkDefaults(steps=3)
SUBJECTS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "bear", "duck"]
PLACES = ["on a bench", "in a field", "by a lake", "in the snow", "on a rooftop"]
MASK_KEY = "masks/square.png"
# Compared between runs; latency and worker differ from run to run by nature.
STABLE = ["group", "variation", "row", "record_id", "variation_index", "prompt", "status"]


def _records() -> tuple[list, list]:
    """30 groups: 15 in our format (one chained, one with a user mask), 15 InstructPix2Pix
    (two rows sharing the first input); then malformed rows, those JSON alone can hold last."""
    ours = [
        {
            "id": f"o{i}",
            "base_prompt": f"a photo of a {SUBJECTS[i % 8]} {PLACES[i % 5]}",
            "seed": i,
            "variations": [f"a photo of a {SUBJECTS[(i + 1) % 8]} {PLACES[i % 5]}"]
            + ([f"a painting of a {SUBJECTS[i % 8]} {PLACES[i % 5]}"] if i % 3 == 0 else []),
        }
        for i in range(15)
    ]
    ours[3]["chain"] = True
    ours[4]["variations"] = [{"prompt": "a photo of a red owl in the snow", "mask": MASK_KEY}]
    pix2pix = [
        {
            "input": f"a {color} house {PLACES[i % 5]}",
            "edit": "make it winter",
            "output": f"a {color} house {PLACES[i % 5]} in winter",
            "seed": i,
        }
        for i, color in enumerate(["red", "blue", "green", "white", "gray"] * 3)
    ]
    pix2pix.insert(1, pix2pix[0] | {"edit": "add a tree", "output": "a red house with a tree"})
    malformed = [
        {"id": "m0", "seed": 1, "variations": ["a dog"]},
        {"id": "m1", "base_prompt": "a cat", "seed": 1, "variations": []},
        {"id": "m2", "base_prompt": "   ", "seed": 1, "variations": ["a dog"]},
        {"id": "m3", "base_prompt": "a cat", "seed": 1, "variations": ["x" * 2001]},
    ]
    json_only = [{"id": "m4", "base_prompt": "a cat", "seed": "one", "variations": ["a dog"]}]
    return ours + pix2pix + malformed, json_only


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    # After s3_endpoint: Ray's workers inherit the S3 credentials it puts in the environment.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False)
    yield
    ray.shutdown()


def _mask_png() -> bytes:
    mask = np.zeros((32, 32), dtype=np.uint8)  # the tiny model's latent size
    mask[8:20, 8:20] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(tiny_model_dir: str, store: StoreConfig) -> ServiceConfig:
    config = ServiceConfig(model=tiny_model_dir, engine=ENGINE, store=store)
    config.store.open().put(MASK_KEY, _mask_png())
    return config


def _options(run: str, **overrides) -> BulkOptions:
    options = {"workers": 2, "actor_num_cpus": 0.5, "defaults": DEFAULTS, "progress": False}
    return BulkOptions(run=run, **options | overrides)


@pytest.fixture(scope="module")
def local_run(cluster, tiny_model_dir, tmp_path_factory):
    """The reference: one uninterrupted run over the JSONL into a local directory store."""
    root = tmp_path_factory.mktemp("bulk")
    records, json_only = _records()
    path = root / "variations.jsonl"
    path.write_text("\n".join([*map(json.dumps, records + json_only), "{not json"]) + "\n")
    config = _config(tiny_model_dir, StoreConfig(url=str(root / "store")))
    summary = run_bulk(str(path), config, _options("full"))
    return path, config, summary


def _image(store, key: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(store.get(key))))


def test_jsonl_run_writes_every_output_and_a_manifest_that_matches(local_run):
    path, config, summary = local_run
    store, layout = config.store.open(), BulkLayout(tenant="local", run="full")
    manifest = pd.read_parquet(os.path.join(config.store.url, layout.manifest_key))

    ok, failed = manifest[manifest.status == "ok"], manifest[manifest.status == "failed"]
    assert summary.groups == 30 and manifest.group.nunique() == 30
    assert len(ok) == summary.succeeded == 36 and len(failed) == summary.failed == 6
    assert summary.computed == 36 and summary.resumed == 0 and summary.remaining == 0
    for row in ok.itertuples():
        assert row.image_key == layout.image_key(row.group, row.variation)
        assert row.mask_key == layout.mask_key(row.group, row.variation)
        assert row.base_image_key == layout.base_key(row.group)
        for key in (row.image_key, row.mask_key, row.base_image_key):
            assert store.exists(key), key
        assert 0.0 <= row.mask_ratio <= 1.0 and 0.0 < row.mac_fraction < 1.0
        assert row.latency_s > 0 and row.worker
    # Rows follow the input, and the InstructPix2Pix rows sharing an input are one group.
    assert list(manifest.row) == sorted(manifest.row)
    shared = manifest[manifest.record_id.isin(["row15", "row16"])]
    assert shared.group.nunique() == 1
    assert [v.split("-")[0] for v in shared.variation] == ["v0", "v0"]  # each its row's first
    assert ok[ok.record_id == "o4"].mask_ratio.tolist() == [pytest.approx(144 / 32**2)]
    # Ray Data reads the manifest too.
    rows = ray.data.read_parquet(os.path.join(config.store.url, layout.manifest_key)).take_all()
    assert sorted(r["prompt"] or "" for r in rows) == sorted(manifest.prompt.fillna(""))
    assert summary.mean_mac_fraction == pytest.approx(ok.mac_fraction.mean())
    assert summary.dense_estimate_s > 0 and summary.edits_per_s > 0


def test_malformed_rows_are_failed_with_their_reason(local_run):
    _, config, _ = local_run
    rows = read_manifest(config.store.open(), BulkLayout(tenant="local", run="full"))
    failed = {r.row: r.error for r in rows if r.status == "failed"}
    assert len(failed) == 6
    reasons = list(failed.values())
    for reason in (
        "base_prompt: Field required",
        "variations: List should have at least 1 item",
        "prompt must contain text",
        "String should have at most 2000 characters",
        "seed: Input should be a valid integer",
        "line is not JSON",
    ):
        assert sum(reason in r for r in reasons) == 1, reason


def test_each_base_is_generated_once_and_each_variation_equals_the_engine_edit(
    local_run, tiny_model_dir
):
    path, config, summary = local_run
    records, json_only = _records()
    groups = parse_records(records + json_only, "full", DEFAULTS, producer(config)).groups
    assert summary.base_generations == {g.id: 1 for g in groups}

    store, layout = config.store.open(), BulkLayout(tenant="local", run="full")
    engine = Engine.from_pretrained(tiny_model_dir, ENGINE)
    # Each actor runs one thread (Ray sets OMP_NUM_THREADS from its num_cpus); so does the
    # reference here, since float sums in another order differ in their last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_against_the_engine(engine, store, layout, groups)
    finally:
        torch.set_num_threads(threads)


def test_a_rerun_after_records_changed_computes_those_records_alone_and_keeps_no_stale_row(
    local_run, tmp_path
):
    path, config, _ = local_run
    shutil.copytree(config.store.url, tmp_path / "store")  # the finished run, to change
    config = config.model_copy(update={"store": StoreConfig(url=str(tmp_path / "store"))})
    records = [json.loads(line) for line in path.read_text().splitlines()[:-1]]
    old_prompt = records[1]["variations"][0]
    records[1]["variations"][0] = "a photo of a wolf in a field"
    records[2]["id"] = "o2-renamed"  # a record's id is part of its rows' keys: recomputed
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(map(json.dumps, records)) + "\n")

    summary = run_bulk(str(changed), config, _options("full", workers=1))

    assert (summary.computed, summary.resumed, summary.succeeded) == (2, 34, 36)
    rows = read_manifest(config.store.open(), BulkLayout(tenant="local", run="full"))
    prompts = [r.prompt for r in rows if r.record_id == "o1"]
    assert prompts == ["a photo of a wolf in a field"] and old_prompt not in prompts
    assert len(rows) == 41  # as before, less the unreadable last line
    assert [r.row for r in rows if r.record_id == "o2-renamed"] == [2]
    assert not [r for r in rows if r.record_id == "o2"]


def _check_against_the_engine(engine, store, layout, groups) -> None:
    chained = next(g for g in groups if g.chain)
    pair = next(g for g in groups if len(g.variations) == 2 and not g.chain)
    pix2pix_pair = next(g for g in groups if len(g.variations) == 2 and g.variations[0].edit)
    for group in (chained, pair, pix2pix_pair):
        params = group.generation.model_dump()
        base = engine.generate(**params)
        assert np.array_equal(_image(store, layout.base_key(group.id)), base.image)
        chain = engine.generate(**params)
        for variation in group.variations:
            # Independent variations: each the first edit of a fresh base; a chain in turn.
            session = chain if group.chain else engine.generate(**params)
            version = session.edit(variation.prompt)
            image = _image(store, layout.image_key(group.id, variation.id))
            assert np.array_equal(image, version.image), (group.id, variation.id)


def _group(prompts: list[str], chain: bool, **generation) -> BulkGroup:
    params = GenerationParams(prompt="a cat on a bench", seed=3, steps=3, **generation)
    variations = [
        GroupVariation(id=f"v{i}", prompt=p, row=0, record_id="r", index=i)
        for i, p in enumerate(prompts)
    ]
    return BulkGroup(id="g1", generation=params, chain=chain, variations=variations)


def test_a_variation_that_changes_nothing_is_its_base_image_with_an_empty_mask(
    cluster, tiny_model_dir, tmp_path
):
    editor = GroupEditor(
        _config(tiny_model_dir, StoreConfig(url=str(tmp_path))).model_dump_json(), "r"
    )
    # The same text embeddings as the base's prompt (CLIP lowercases): nothing to edit; the
    # chain goes on from it.
    group = _group(["A cat on a bench", "a dog on a bench"], chain=True)

    (same, dog), generations = editor.run_group(group, {"v0", "v1"})

    assert generations == 1 and (same.status, dog.status) == ("ok", "ok")
    assert (same.mask_ratio, same.mac_fraction) == (0.0, 0.0) and 0 < dog.mac_fraction < 1
    store = editor.store
    assert np.array_equal(_image(store, same.image_key), _image(store, same.base_image_key))
    assert not _image(store, same.mask_key).any() and _image(store, dog.mask_key).any()
    assert store.exists(editor.layout.row_key("g1", "v1"))


def test_a_base_that_cannot_be_generated_fails_its_variations_and_stores_nothing(
    cluster, tiny_model_dir, tmp_path
):
    editor = GroupEditor(
        _config(tiny_model_dir, StoreConfig(url=str(tmp_path))).model_dump_json(), "r"
    )
    group = _group(["a dog on a bench", "a fox on a bench"], chain=False, height=72)

    rows, _ = editor.run_group(group, {"v0", "v1"})

    assert [r.status for r in rows] == ["failed", "failed"]
    assert all(
        r.error.startswith(
            "RuntimeError: the base generation failed: ValueError: height: 72 is not"
        )
        for r in rows
    )
    assert not list(editor.store.list(editor.layout.prefix))


@pytest.fixture(scope="module")
def parquet_on_s3(cluster, s3_endpoint):
    records, _ = _records()
    # A Parquet column has one type: here every variation is a {prompt, mask} struct.
    for record in records:
        if "variations" in record:
            record["variations"] = [
                v if isinstance(v, dict) else {"prompt": v, "mask": None}
                for v in record["variations"]
            ]
    buffer = io.BytesIO()
    columns = dict.fromkeys(name for record in records for name in record)
    pq.write_table(pa.table({n: [r.get(n) for r in records] for n in columns}), buffer)
    key = "bulk-inputs/variations.parquet"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=BUCKET, Key=key, Body=buffer.getvalue()
    )
    return f"s3://{BUCKET}/{key}"


def _stored_rows(store, layout: BulkLayout) -> int:
    return sum(key.endswith(".json") for key in store.list(layout.prefix))


def test_a_killed_driver_loses_nothing_and_the_rerun_computes_only_the_rest(
    local_run, parquet_on_s3, s3_endpoint, tiny_model_dir, tmp_path
):
    """The first attempt is the Ray Jobs entrypoint in its own process, killed part way."""
    _, local_config, _ = local_run
    store_config = StoreConfig(url=f"s3://{BUCKET}/bulk-killed", endpoint_url=s3_endpoint)
    config = _config(tiny_model_dir, store_config)
    (tmp_path / "service.yaml").write_text(config.to_yaml())
    store, layout = config.store.open(), BulkLayout(tenant="local", run="killed")
    command = [
        sys.executable,
        "jobs/bulk_variations.py",
        parquet_on_s3,
        "--run",
        "killed",
        "--config",
        str(tmp_path / "service.yaml"),
        "--workers",
        "2",
        "--actor-cpus",
        "0.5",
        "--steps",
        "3",
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(command, cwd=REPO, env=os.environ | {"PYTHONPATH": REPO})
    try:

        def five_rows_stored() -> bool:
            if _stored_rows(store, layout) >= 5:
                return True
            assert driver.poll() is None, "driver ended early"
            return False

        wait_until(five_rows_stored, "5 stored rows", 600, interval=0.5)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    done_at_kill = _stored_rows(store, layout)

    summary = run_bulk(parquet_on_s3, config, _options("killed"))

    assert summary.resumed >= done_at_kill and summary.computed == 36 - summary.resumed
    assert summary.computed < 36 and summary.succeeded == 36
    resumed = pd.read_parquet(io.BytesIO(store.get(layout.manifest_key)))
    local_store = local_config.store.open()
    reference = pd.DataFrame(
        [r.model_dump() for r in read_manifest(local_store, BulkLayout(tenant="local", run="full"))]
    )
    # The Parquet holds the same records but the JSON-only row and the unreadable line.
    reference = reference[reference.row < len(_records()[0])].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed[STABLE], reference[STABLE], check_dtype=False)
    for row in resumed[resumed.status == "ok"].itertuples():
        local_key = row.image_key.replace("/killed/", "/full/")
        assert np.array_equal(_image(store, row.image_key), _image(local_store, local_key))


def test_cli_arguments_override_the_service_config(tmp_path):
    (tmp_path / "service.yaml").write_text("tenant: acme\nmodel: tiny\n")
    parser = argparse.ArgumentParser()
    add_bulk_arguments(parser)
    args = parser.parse_args(
        [
            "in.jsonl",
            "--run",
            "r1",
            "--config",
            str(tmp_path / "service.yaml"),
            "--out",
            "s3://bucket/prefix",
            "--endpoint-url",
            "http://127.0.0.1:9000",
            "--steps",
            "4",
            "--mask-steps",
            "2",
            "--workers",
            "3",
            "--max-groups",
            "5",
        ]
    )

    config, options = bulk_settings(args)

    assert config.tenant == "acme" and config.model == "tiny"
    assert config.store.url == "s3://bucket/prefix"
    assert config.store.endpoint_url == "http://127.0.0.1:9000"
    assert config.engine.edit.mask_steps == 2
    assert (options.run, options.workers, options.max_groups) == ("r1", 3, 5)
    assert options.defaults.steps == 4


@pytest.mark.parametrize("mask_steps", ["0", "-1"])
def test_a_mask_steps_flag_out_of_range_is_refused_naming_it(mask_steps):
    parser = argparse.ArgumentParser()
    add_bulk_arguments(parser)
    args = parser.parse_args(["in.jsonl", "--run", "r", "--mask-steps", mask_steps])

    with pytest.raises(ValidationError, match="engine.edit.mask_steps"):
        bulk_settings(args)


def test_actors_reserve_the_configs_worker_resources():
    gpu = ServiceConfig.model_validate(
        {"engine": {"device": "cuda"}, "worker_resources": {"num_cpus": 4, "num_gpus": 1}}
    )
    slots = ServiceConfig.model_validate(
        {"worker_resources": {"num_cpus": 1, "resources": {"edit_slot": 1}}}
    )

    assert _actor_resources(gpu, BulkOptions(run="r")) == {"num_cpus": 4, "num_gpus": 1}
    assert _actor_resources(slots, BulkOptions(run="r", actor_num_cpus=0.5)) == {
        "num_cpus": 0.5,
        "num_gpus": 0,
        "resources": {"edit_slot": 1},
    }
