"""The offline Hub's pages for people: its front page (the repos one may see) and a repo's card as HTML."""

from __future__ import annotations

import html
import re

_IMG = re.compile(r'(<img [^>]*src=")(?!https?://|/)([^"]+)(")')
_SITE_LINK = re.compile(r'(<a [^>]*href=")/(?!/)')


def render_card_page(repo_id: str, readme: str, files: list[str], file_base: str, *, site: str = "") -> str:
    """`site`: the Hub's address, for a page read from disk (the card's links to other repos, "/owner/name",
    then lead there rather than to the file system's root)."""
    from markdown_it import MarkdownIt

    body = readme
    meta = ""
    if readme.startswith("---"):
        _, meta, body = readme.split("---", 2)
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    rendered = _IMG.sub(lambda m: f"{m[1]}{file_base}{m[2]}{m[3]}", rendered)
    if site:
        rendered = _SITE_LINK.sub(lambda m: f"{m[1]}{site.rstrip('/')}/", rendered)
    listing = "".join(f'<li><a href="{file_base}{html.escape(f)}">{html.escape(f)}</a></li>' for f in files)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(repo_id)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.45}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}img{{max-width:100%}}
pre{{background:#f4f4f4;padding:.8em;overflow:auto}}.meta{{color:#555;font-size:.9em}}</style></head>
<body><p class="meta">offline Hub &middot; {html.escape(repo_id)}</p>
<details class="meta"><summary>card metadata</summary><pre>{html.escape(meta.strip())}</pre></details>
{rendered}<h2>Files</h2><ul>{listing}</ul></body></html>"""


STYLE = """<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.meta{color:#555}</style>"""


def render_repo_list(repos: list[tuple[str, str, list[str]]], url: str) -> str:
    """(repo id, last modified, tags) rows as a page: what `HF_ENDPOINT` points at, for a person's browser."""
    rows = "".join(
        f'<tr><td><a href="/{html.escape(r)}">{html.escape(r)}</a></td><td>{html.escape(when[:19].replace("T", " "))}'
        f"</td><td>{html.escape(', '.join(tags))}</td></tr>"
        for r, when, tags in repos
    )
    empty = "" if repos else "<p>No model repos yet (or none this token may see).</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>offline Hub</title>{STYLE}</head>
<body><h1>offline Hub</h1><p class="meta">{len(repos)} model repos at {html.escape(url)} &middot; use it with
<code>HF_ENDPOINT={html.escape(url)}</code></p>{empty}
<table><tr><th>repo</th><th>last modified</th><th>tags</th></tr>{rows}</table></body></html>"""
