"""The whole flow with its storage root on an S3 endpoint over HTTP (moto server on 127.0.0.1)."""

from __future__ import annotations

import json

import s3fs

from flows.model_soup import model_soup
from model_soups.config import parse_config
from tests.conftest import small_digits


def test_flow_runs_with_storage_on_s3(prefect_server, s3_endpoint):
    config = parse_config({**small_digits("s3://soup-bucket/soups", experiment="s3", n=3),
                           "storage": {"root": "s3://soup-bucket/soups", "endpoint_url": s3_endpoint}})
    paths = model_soup(config=config)
    assert paths["run"].startswith("s3://soup-bucket/soups/s3/runs/")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    run = paths["run"].removeprefix("s3://")
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"soup.safetensors", "manifest.json", "results.csv", "results.parquet", "report.md", "report.html"} <= listed
    manifest = json.loads(fs.cat(f"{run}/manifest.json"))
    assert all(i["checkpoint"].startswith("s3://soup-bucket/soups/s3/ingredients/") for i in manifest["ingredients"])
    assert len(fs.ls("soup-bucket/soups/s3/ingredients")) == 3
    text = fs.cat(f"{run}/manifest.json").decode() + fs.cat(f"{run}/report.md").decode()
    assert "testing-secret" not in text and "testing-key" not in text
