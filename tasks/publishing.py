"""The publish task: the run folder, and the results, report and soup as Prefect artifacts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from model_soups import publishing, report
from model_soups.context import RunContext
from model_soups.records import EvaluationRecord, FailedIngredient, IngredientRecord, PretrainedRecord, SoupRecord
from model_soups.sweep import SweepStop
from tasks import QUIET, artifact_key


@task(name="publish", **QUIET)
def publish(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord], failed: list[FailedIngredient],
            evaluations: list[EvaluationRecord], soup_records: list[SoupRecord], run_id: str,
            start: list[EvaluationRecord], stop: SweepStop | None = None) -> dict[str, str]:
    """Write the soup, manifest, results and report; publish them as Prefect artifacts. Returns the run folder's
    paths by name (run, soup, report.md, report.html, hf)."""
    run = publishing.publish(ctx, pretrained, metas, failed, evaluations, soup_records, run_id, start,
                             get_run_logger().info, stop)
    run_id = run.run_id  # another run's, when this run completed its half-published folder
    config, store = ctx.config, ctx.store
    table = report.summary(report.read_results(store, run.url)).round(2).reset_index()
    create_table_artifact(key=artifact_key(config, "results"), table=table.to_dict(orient="records"),
                          description=f"Accuracy (%) per method, run {run_id}")
    create_markdown_artifact(key=artifact_key(config, "report"), markdown=report.embedded_markdown(store, run.url),
                             description=f"Model soup report, run {run_id}, figures included")
    expiry = config.storage.link_expiry_s
    where = (f"a presigned link, valid for {expiry / 3600:.3g} h" if store.backend.presigned else
             "a path on the machine that ran the flow (a browser does not open file:// links from this page)")
    for key, url in (("soup", run.soup), ("report-html", run.file("report.html"))):
        name = url.rsplit("/", 1)[1]
        create_link_artifact(key=artifact_key(config, key), link=store.browser_link(url, expiry),
                             link_text=f"{name} ({run_id})", description=f"{name} of run {run_id}: {where}")
    return run.paths(store)
