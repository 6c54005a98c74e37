"""``kubetask deploy PATH``: code-first deploy (docs/deploy.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from kubetask.cli.common import JsonFlag, Namespace, app, fail, print_json

if TYPE_CHECKING:
    from kubetask.sdk.credentials import KubeConfig


def _default_runner_image() -> str:
    from kubetask.settings import Settings

    return os.environ.get("KUBETASK_RUNNER_IMAGE") or str(Settings.model_fields["runner_image"].default)


@app.command("deploy")
def deploy(
    path: Annotated[
        Path,
        typer.Argument(
            help="A package (directory with __init__.py), a module (.py), or a directory of them."
        ),
    ],
    image: Annotated[
        str | None,
        typer.Option("--image", help="Use this image (it holds the package already): build nothing."),
    ] = None,
    runner_image: Annotated[
        str | None,
        typer.Option(
            "--runner-image",
            help="The image to build FROM. Default: KUBETASK_RUNNER_IMAGE, else the operator's default.",
            show_default=False,
        ),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(
            "--repository",
            help="Image repository; the tag is the content hash. Default: localhost/kubetask-tasks/<package>.",
            show_default=False,
        ),
    ] = None,
    requirements: Annotated[
        Path | None,
        typer.Option(
            "--requirements",
            "-r",
            help="A pip requirements file installed in the image. Default: requirements.txt in PATH "
            "(or beside the module PATH), if present.",
            show_default=False,
        ),
    ] = None,
    builder: Annotated[
        str, typer.Option("--builder", help="auto (buildah, else docker), buildah or docker.")
    ] = "auto",
    push: Annotated[
        bool, typer.Option("--push", help="Push the image after building it (a remote cluster).")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the Tasks (YAML; JSON with --json); build and apply nothing."),
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Delete the Tasks an earlier deploy of this package made that its code no longer has "
            "(never Tasks written by hand; kept while runs of them are unfinished).",
        ),
    ] = False,
    namespace: Namespace = None,
    as_json: JsonFlag = False,
) -> None:
    """Deploy the @task functions under PATH as Tasks: build an image FROM the runner image
    with the package (tagged by content: unchanged code builds nothing), then apply one
    Task per function, its spec from the decorator (retry, queue, max_duration_seconds, pod,
    ttl_seconds_after_finished); with --prune, delete the Tasks the package no longer has.
    On any error nothing is applied."""
    from kubetask.deploy import DeployError, discover, manifests
    from kubetask.deploy import image as images

    try:
        package = discover.find_package(path, requirements)
        found = discover.find_tasks(package)
        runner = runner_image or _default_runner_image()
        chosen: images.Builder | None = None
        if image is None:
            try:
                chosen = images.pick_builder(builder)
            except DeployError:
                if not dry_run:
                    raise
        if chosen is not None and not dry_run:
            images.ensure_runner(chosen, runner)
        ref = image or images.image_ref(package, runner_image=runner, builder=chosen, repository=repository)
        kube = _maybe_kubeconfig() if dry_run else manifests.kubeconfig()
        ns = namespace or manifests.default_namespace(kube)
        docs = [manifests.task_manifest(f, image=ref, namespace=ns, package=package.label) for f in found]
        keep = {f.name for f in found}
        if dry_run:
            if prune:
                if kube is None:
                    raise DeployError(
                        "--prune needs the cluster (a kubeconfig) to see what an earlier deploy made"
                    )
                applier = manifests.Applier(kube)
                try:
                    would = applier.prune(ns, package.label, keep, dry_run=True)
                finally:
                    applier.close()
                for p in would:
                    what = "would be deleted" if p.deleted else f"kept: {p.unfinished} runs unfinished"
                    typer.echo(f"task.kubetask.dev/{p.name} {what} (no longer in the code)", err=True)
            if as_json:
                print_json(docs)
            else:
                typer.echo(yaml.safe_dump_all(docs, sort_keys=False).rstrip())
            return
        assert kube is not None
        applier = manifests.Applier(kube)
        try:
            applier.check(docs)
            built = None
            if image is None:
                assert chosen is not None
                built = images.ensure_image(package, ref=ref, runner_image=runner, builder=chosen, push=push)
            applied = applier.apply(docs)
            pruned = applier.prune(ns, package.label, keep) if prune else []
        finally:
            applier.close()
    except DeployError as e:
        fail(str(e))
    entry = {f.name: f.entrypoint for f in found}
    result: dict[str, Any] = {
        "namespace": ns,
        "image": ref,
        "built": bool(built and built.built),
        "imported": bool(built and built.imported),
        "pushed": bool(built and built.pushed),
        "tasks": [{"name": a.name, "entrypoint": entry[a.name], "outcome": a.outcome} for a in applied],
        "pruned": [{"name": p.name, "deleted": p.deleted, "unfinishedRuns": p.unfinished} for p in pruned],
    }
    if as_json:
        print_json(result)
        return
    how = "given" if built is None else "built" if built.built else "unchanged, not rebuilt"
    extra = ", imported into the local cluster" if result["imported"] else ""
    extra += ", pushed" if result["pushed"] else ""
    typer.echo(f"image {ref} ({how}{extra})")
    for t in result["tasks"]:
        typer.echo(f"task.kubetask.dev/{t['name']} {t['outcome']} ({t['entrypoint']}) in {ns}")
    for p in pruned:
        if p.deleted:
            typer.echo(f"task.kubetask.dev/{p.name} deleted (no longer in the code) in {ns}")
        else:
            typer.echo(
                f"task.kubetask.dev/{p.name} kept: {p.unfinished} runs unfinished; it is no longer in the "
                f"code (deploy with --prune again once they end) in {ns}"
            )


def _maybe_kubeconfig() -> KubeConfig | None:
    """For --dry-run: the kubeconfig's namespace if there is one, never an error."""
    from kubetask.deploy import DeployError, manifests

    try:
        return manifests.kubeconfig()
    except DeployError:
        return None
