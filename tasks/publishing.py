"""Publishing: the run folder (`publish`, where the soups were cooked), then the results, report and soup as
Prefect artifacts of the model-soup run (`show_run`)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from model_soups import publishing, report
from model_soups.context import RunContext
from model_soups.records import Cooked, EvaluationRecord, FailedIngredient, IngredientRecord, PretrainedRecord
from model_soups.storage import RunFolder
from model_soups.sweep import SweepStop
from tasks import QUIET, artifact_key


@task(name="publish", **QUIET)
def publish(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord], failed: list[FailedIngredient],
            evaluations: list[EvaluationRecord], cooked: Cooked, run_id: str, stop: SweepStop | None = None) -> str:
    """Write the run folder: the soup, manifest, results and report. Returns its URL (another run's, when this run
    completed its half-published folder)."""
    return publishing.publish(ctx, pretrained, metas, failed, evaluations, cooked, run_id, get_run_logger().info,
                              stop).url


@task(name="show-run", **QUIET)
def show_run(ctx: RunContext, url: str) -> dict[str, str]:
    """The published run folder's results, report and links as Prefect artifacts; its paths by name (run, soup,
    report.md, report.html, hf). Reads the results and the report, no checkpoint."""
    config, store, run = ctx.config, ctx.store, RunFolder(url)
    run_id = run.run_id
    table = report.summary(report.read_results(store, run.url)).round(2).reset_index()
    create_table_artifact(key=artifact_key(config, "results"), table=table.to_dict(orient="records"),
                          description=f"Accuracy (%) per method, run {run_id}")
    create_markdown_artifact(key=artifact_key(config, "report"), markdown=report.embedded_markdown(store, run.url),
                             description=f"Model soup report, run {run_id}, figures included")
    expiry = config.storage.link_expiry_s
    where = (f"a presigned link, valid for {expiry / 3600:.3g} h" if store.backend.presigned else
             "a path on the machine that ran the flow (a browser does not open file:// links from this page)")
    for key, file in (("soup", run.soup), ("report-html", run.file("report.html"))):
        name = file.rsplit("/", 1)[1]
        create_link_artifact(key=artifact_key(config, key), link=store.browser_link(file, expiry),
                             link_text=f"{name} ({run_id})", description=f"{name} of run {run_id}: {where}")
    return run.paths(store)
