"""The app's Questions tab: the answers of services.questions (the same as docs/questions.md), each link
relative (`?tab=layer&...`), so a click reopens the app in the state that shows the answer.

The answers' markdown uses only paragraphs, `code`, **bold**, *italics* and [links](page.md); this module
turns that subset into HTML. A link to a docs page becomes the page's path in code: the app does not
serve the docs.
"""

from __future__ import annotations

import html
import re

import ipywidgets as widgets

from ..services.questions import QUESTIONS, Question

CSS_CLASS = "gptq-questions"  # the tab's HTML (tests look for it)
LINK_CLASS = "gptq-question-link"  # each app link, with its query in data-query

_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*([^*]+)\*(?![*\w])")


def inline_html(markdown: str) -> str:
    """One paragraph of the answers' markdown as HTML (escaped first; code spans are left as they are)."""
    codes: list[str] = []

    def keep_code(m):
        codes.append(f"<code>{m.group(1)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = _CODE.sub(keep_code, html.escape(markdown, quote=False))

    def link(m):
        label, target = m.group(1), m.group(2)
        if target.startswith("http"):
            return f"<a href='{html.escape(target)}' target='_blank' rel='noopener'>{label}</a>"
        return f"{label} (<code>docs/{target}</code>)" if label != target else f"<code>docs/{target}</code>"

    text = _ITALIC.sub(r"<i>\1</i>", _BOLD.sub(r"<b>\1</b>", _LINK.sub(link, text)))
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def question_html(q: Question) -> str:
    links = "".join(
        f"<li><a class='{LINK_CLASS}' data-query='{html.escape(link.query)}' "
        f"href='?{html.escape(link.query)}'>{html.escape(link.shows)}</a></li>" for link in q.links)
    return (f"<div class='gptq-question' id='q-{q.slug}' style='margin:0 0 14px 0'>"
            f"<h4 style='margin:6px 0'>{inline_html(q.title)}</h4>"
            f"<div style='font-size:12px;color:#555'>Asked in <a href='{html.escape(q.source_url)}' "
            f"target='_blank' rel='noopener'>{html.escape(q.source)}</a></div>"
            f"<p style='margin:4px 0;line-height:1.45'>{inline_html(q.answer)}</p>"
            f"<ul style='margin:2px 0'>{links}</ul></div>")


def questions_html() -> str:
    intro = ("Questions asked in the issue trackers of GPTQ's implementations, each answered in a paragraph. "
             "Each link reopens this app in the state that shows the answer (the same page is "
             "<code>docs/questions.md</code>).")
    body = "".join(question_html(q) for q in QUESTIONS)
    return (f"<div class='{CSS_CLASS}' style='max-width:900px;font-size:13px'>"
            f"<h3 style='margin:4px 0'>Questions people ask</h3><p>{intro}</p>{body}</div>")


class QuestionsTab:
    """The tab's widget (`root`): static HTML, built when the tab is first shown."""

    def __init__(self):
        self.root = widgets.HTML(questions_html())

    @property
    def widget(self) -> widgets.Widget:
        return self.root
