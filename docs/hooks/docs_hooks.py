"""MkDocs hooks for fastpgcache's site (mkdocs.yml `hooks:`).

- The benchmark charts are served from benchmarks/results/, their only copy:
  a page links them as `../benchmarks/results/NAME.png` (right on GitHub too),
  and the site serves them as `benchmarks/NAME.png`.
- Docstrings use reST's `::` before an indented example; in Markdown the
  example is already a code block, so the colon pair becomes one colon.
"""
from __future__ import annotations

from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
LINK_FROM_PAGE = "](../benchmarks/results/"
LINK_ON_SITE = "](benchmarks/"


class _LiteralMarkers(Preprocessor):
    """`text::` becomes `text:`, and a line holding only `::` goes; fenced code is left alone.

    The block after `::` is code. When a docstring's only indented lines are that
    block, cleaning the docstring leaves it unindented; it is indented again here,
    up to the next blank line, so Markdown still reads it as code.
    """

    def run(self, lines: list[str]) -> list[str]:
        # literal: None; "next" after `::` until the block's first line; "indent" inside an unindented block.
        out, fenced, literal = [], False, None
        for line in lines:
            if literal == "next" and line.strip():
                literal = None if line.startswith((" ", "\t")) else "indent"  # indented: already code
            if literal == "indent":
                if line.strip():
                    out.append("    " + line)
                    continue
                literal = None
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and not line.startswith((" ", "\t")):
                if line.strip() == "::":
                    literal = "next"
                    continue
                if line.endswith("::") and not line.endswith(":::"):
                    line = line[:-1]
                    literal = "next"
            out.append(line)
        return out


class LiteralMarkers(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Python-Markdown's name)
        md.preprocessors.register(_LiteralMarkers(md), "fastpgcache_literal_markers", 30)


def on_config(config):
    config.markdown_extensions.append(LiteralMarkers())
    return config


def on_files(files, config):
    for chart in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown, page, config, files):
    if LINK_FROM_PAGE in markdown:
        if "/" in page.file.src_uri:
            raise ValueError(f"{page.file.src_uri}: benchmark charts are linked from top-level pages only")
        markdown = markdown.replace(LINK_FROM_PAGE, LINK_ON_SITE)
    return markdown

