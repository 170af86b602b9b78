"""One renderer per ``--format`` choice. Renderers turn result records into text."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class OutputFormat(str, enum.Enum):
    TERMINAL = "terminal"
    JSON = "json"
    MARKDOWN = "markdown"
    HTML = "html"


@dataclass(frozen=True)
class RenderOptions:
    all_layers: bool = False
    top: int = 8
    per_channel: bool = False
    color: bool = False
    width: int = 120


def renderer_for(fmt: OutputFormat):
    """The renderer class for a format; every OutputFormat member has one."""
    if fmt is OutputFormat.JSON:
        from .json import JsonRenderer

        return JsonRenderer
    if fmt is OutputFormat.MARKDOWN:
        from .markdown import MarkdownRenderer

        return MarkdownRenderer
    if fmt is OutputFormat.HTML:
        from .html import HtmlRenderer

        return HtmlRenderer
    if fmt is OutputFormat.TERMINAL:
        from .terminal import TerminalRenderer

        return TerminalRenderer
    raise ValueError(f"no renderer for {fmt!r}")
