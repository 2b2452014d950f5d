"""`compress --collection X --refit`: every member compressed again, together, from its recorded source.

Members that joined one by one were projected onto bases fitted without them; a refit fits the bases to all
of them. The summary says, per member, how its error changed, and for the joined ones how far they had drifted
from what a joint fit gives them. The collection and every member get a new revision (their repos are kept).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..collection.format import Member
from ..collection.remote import open_collection
from ..compression.config import CompressConfig
from ..compression.report import Report
from ..errors import SoppuError
from ..hub.common import is_repo_id
from .job import JobSpec


def refit_spec(spec: JobSpec) -> tuple[JobSpec, list[Member]]:
    """The compress run a refit is: the members' recorded sources, the collection's recorded settings (on this
    machine's --device), each member's own repo. Refused in one line before anything runs when a source is a
    folder this machine lacks or a member was never pushed."""
    if not spec.collection:
        raise SoppuError("--refit needs --collection owner/name (the collection to fit again)")
    if spec.sources:
        raise SoppuError("--refit takes its sources from the collection's members list; name no adapters with it")
    coll = open_collection(spec.collection, token=spec.token)
    members = coll.members
    if not members:
        raise SoppuError(f"collection {coll.name} has no members to refit")
    local = [m.source for m in members if not is_repo_id(m.source.split("@")[0]) and not Path(m.source).is_dir()]
    if local:
        raise SoppuError(
            f"--refit: {len(local)} member source(s) are folders this machine lacks (first: {local[0]}); run "
            "the refit where they are, or push those adapters to the Hub and join again"
        )
    if spec.push and any(m.repo_id is None for m in members):
        first = next(m.name for m in members if m.repo_id is None)
        raise SoppuError(
            f"--refit: member {first} was never pushed, so it has no repo to publish to; join it again with a "
            "push first"
        )
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    settings = {k: v for k, v in coll.info.settings.items() if k in known} | {"device": spec.config.device}
    refit = dataclasses.replace(
        spec,
        sources=[m.source for m in members],
        config=CompressConfig(**settings),
        repo_ids=[m.repo_id for m in members] if spec.push else [],
    )
    return refit, members


def drift(members: list[Member], report: Report) -> list[dict]:
    """Per member: its error before (as listed) and after the joint refit; `drift` = before - after for the members
    that had joined (how much a joint fit would have done better for them)."""
    rows = []
    for m, a in zip(members, report.adapters):
        row = {
            "name": m.repo_id or m.name,
            "how": m.how,
            "before": m.mean_rel_error,
            "after": a.mean_rel_error,
            "cluster_before": m.cluster,
            "cluster_after": a.cluster,
        }
        row["change"] = row["after"] - row["before"]
        rows.append(row)
    return rows


def format_drift(rows: list[dict]) -> str:
    joined = [r for r in rows if r["how"] != "compress"]
    lines = [f"{'member':40s} {'how':12s} {'before':>8s} {'after':>8s} {'change':>8s}"]
    lines += [
        f"{r['name'][:40]:40s} {r['how']:12s} {r['before']:8.4f} {r['after']:8.4f} {r['change']:+8.4f}" for r in rows
    ]
    if joined:
        mean = sum(r["before"] - r["after"] for r in joined) / len(joined)
        lines.append(
            f"joined members: {len(joined)}, their error was {mean:+.4f} above a joint fit on average "
            f"(largest {max(r['before'] - r['after'] for r in joined):+.4f})"
        )
    return "\n".join(lines)
