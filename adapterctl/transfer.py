"""The transfer phase at run time: staging (linked, kept and resumed files), sending, and publishing.

A staging dir is adapterctl's own: an interrupted transfer leaves its pieces there and the next run
continues from them (rsync's partial dir, or the local copy's `.partial` file). Only a full disk
removes them, since nothing can resume on it. Publishing hashes every file on the endpoint; a file
that was linked from a damaged basis is sent fresh once, never shipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapterctl.errors import AdapterctlError, TransportError

if TYPE_CHECKING:  # steps calls in here; the arrow goes one way at run time
    from adapterctl.steps import Publish, StepContext, Transfer


def _no_space(exc: AdapterctlError) -> bool:
    return "No space left" in str(exc) or "disk is full" in str(exc)


def _send(ctx: StepContext, files: dict[str, str], src: str, link_from: str | None, delta: bool, rehash=()):
    """Prepare staging and send what it lacks. Returns (prepare result, SyncResult)."""
    ep, tr = ctx.ep, ctx.transport
    prep = tr.call(
        "prepare_staging",
        adapter_dir=ep.adapter_dir,
        model=ctx.model,
        version=ctx.outcome.version,
        files=files,
        link_from=link_from,
        drop_partial=bool(link_from and delta),
        rehash=list(rehash),
    )
    if prep["damaged"]:
        ctx.say(
            f"warning: releases/{link_from}'s copy of {', '.join(prep['damaged'])} "
            "no longer has its recorded "
            "sha256: sent fresh, not linked (run `adapterctl doctor` for that release)"
        )
    board = ctx.run.board
    progress = (lambda n: board.advance(ctx.endpoint, n)) if board is not None else None
    basis = f"{ep.adapter_dir}/{ctx.model}/releases/{link_from}" if link_from and delta else None
    try:
        result = tr.sync_files(
            Path(src), prep["path"], prep["send"], basis, progress, resume=prep["pieces"] > 0
        )
    except TransportError as exc:
        if _no_space(exc):  # nothing can resume on a full disk: give the space back
            tr.call(
                "remove_staging", adapter_dir=ep.adapter_dir, model=ctx.model, version=ctx.outcome.version
            )
            raise
        raise TransportError(
            f"{exc.message} (during the transfer of {ctx.model} {ctx.outcome.version})",
            "what arrived is kept in staging: rerun the same command and the transfer resumes",
        ) from exc
    ctx.outcome.bytes_sent += result.bytes_sent
    return prep, result


def send_release(ctx: StepContext, step: Transfer) -> None:
    files, src = ctx.run.artifact_files(step)
    prep, result = _send(ctx, files, src, step.link_from, step.delta)
    resumed = f", {len(prep['kept'])} already staged" if prep["kept"] else ""
    pieces = f", resumed {prep['pieces']} partial" if prep["pieces"] else ""
    ctx.say(
        f"sent {result.files_sent} files ({result.bytes_sent} bytes), "
        f"linked {len(prep['linked'])} unchanged{resumed}{pieces}"
    )


def publish_release(ctx: StepContext, step: Publish) -> None:
    """Hash the staged files on the endpoint and rename staging → releases/{id}. Files that fail the
    hash check were removed there; if they came from the basis release they are re-sent once, with
    the basis re-hashed, so a damaged basis never spreads into the new release."""
    run, tr = ctx.run, ctx.transport
    files, src = run.artifact_files(step)
    artifact = run.artifacts.get(step.key) if step.key else None
    entry = run.entry(step.model, step.version) or {}
    meta = {
        "created": run.clock().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": entry.get("sha256") or files.get("adapter_model.safetensors"),
        "deployment_id": run.deployment_id,
        "cycle": entry.get("cycle"),
        "format": artifact.meta.get("format") if artifact else "peft",
    }
    if artifact is not None:
        meta["artifact"] = {k: artifact.meta.get(k) for k in ("key", "kind", "quant", "tools", "base_digest")}
    args = dict(
        adapter_dir=ctx.ep.adapter_dir, model=step.model, version=step.version, files=files, meta=meta
    )
    try:
        tr.call("finalize_release", **args)
    except TransportError as exc:
        bad = (exc.data or {}).get("bad") if exc.kind == "hash_mismatch" else None
        if not bad:
            raise
        ctx.say(
            f"{', '.join(bad)} did not hash to the manifest's sha256 there: sending {len(bad)} file(s) again"
        )
        _send(ctx, files, src, step.link_from, False, rehash=bad)
        tr.call("finalize_release", **args)
    ctx.say(f"hashes verified on the endpoint; published releases/{step.version}")
