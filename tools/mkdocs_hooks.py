"""mkdocs hooks: the nav section "Switching from other libraries" lists every docs/switching-*.md (placed
after the families), so a new mapping page needs no edit of mkdocs.yml; reference-link look-alikes in prose
are escaped."""
import re
from pathlib import Path


def on_config(config):
    pages = sorted(Path(config["docs_dir"]).glob("switching-*.md"))
    if not pages:
        return config
    section = {"Switching from other libraries": [p.name for p in pages]}
    nav = config["nav"]
    at = next((i + 1 for i, item in enumerate(nav) if isinstance(item, dict) and "Families" in item), len(nav))
    nav.insert(at, section)
    return config


def _escape_reference_links(line: str) -> str:
    # `a[0]['params']` in prose (error messages) reads as a Markdown reference link `[0]['params']`,
    # which autorefs reports as a missing target: escape `][` outside code spans.
    parts = re.split(r"(`+[^`]*`+)", line)
    return "".join(p if i % 2 else p.replace("][", "]\\[") for i, p in enumerate(parts))


def on_page_markdown(markdown, **kwargs):
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append(line if fenced else _escape_reference_links(line))
    return "\n".join(out)
