"""The GPU Kubernetes job template, rendered by prefect-kubernetes' own worker configuration for a real flow run
of the finetune deployment's flow, as a Kubernetes client reads it. No cluster is needed, and none is used."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.finetune import finetune_ingredient
from model_soups.config import RunConfig

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "gpu-kubernetes-job-template.json"


@pytest.mark.slow
def test_the_gpu_job_template_renders_into_a_kubernetes_job_with_one_gpu_and_the_flow_runs_command(prefect_server):
    from kubernetes_asyncio.client import ApiClient, V1Job
    from prefect import get_client
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def render() -> tuple[V1Job, str]:
        async with get_client() as client:
            flow_run = await client.create_flow_run(finetune_ingredient, parameters={
                "config": RunConfig().model_dump(mode="json"), "spec": {"id": "abc", "hparams": {"seed": 1}},
                "pretrained": {"url": "s3://b/p.safetensors", "sha256": "0" * 64, "fingerprint": "f"}})
            configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                json.loads(TEMPLATE.read_text()), {"image": "registry.example.com/model-soups:test"})
            configuration.prepare_for_flow_run(flow_run)
        async with ApiClient() as api:  # the client's own reading of a Job, as from the cluster's API
            return api.deserialize(SimpleNamespace(data=json.dumps(configuration.job_manifest)), "V1Job"), str(flow_run.id)

    job, flow_run_id = asyncio.run(render())
    assert isinstance(job, V1Job) and job.kind == "Job" and job.spec.template.spec.restart_policy == "Never"
    (container,) = job.spec.template.spec.containers
    assert container.image == "registry.example.com/model-soups:test"
    assert container.resources.limits["nvidia.com/gpu"] == "1" and container.resources.requests["nvidia.com/gpu"] == "1"
    env = {item.name: item.value for item in container.env}
    assert env["PREFECT__FLOW_RUN_ID"] == flow_run_id  # the pod runs exactly this flow run
    assert container.args[:3] == ["prefect", "flow-run", "execute"]
    assert any(t.key == "nvidia.com/gpu" for t in job.spec.template.spec.tolerations)
