"""Every string of a run that reaches the explorer page stays data: model, weights, dataset and split
names, layer names, settings, the run key and class names, each made hostile (``</script>``, ``<script>``,
quotes, ``&``, an ``onerror`` attribute) and rendered. The page must keep exactly its own elements (no
injected tag or attribute, no JSON element closed early), show each string back as text where it is
written into HTML, and carry it unchanged inside its JSON data. test_explorer.py covers class names in a
browser."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from gig_fast.explorer import render_explorer

from _tiny_run import CLASS_NAMES, HOSTILE, finished_run

pytestmark = pytest.mark.slow  # the shared tiny run (~15 s on two cores)


class _Page(HTMLParser):
    """Tags with their attributes, the text outside scripts, and the text of each script element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.scripts, self._in_script = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append([dict(attrs), ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            self.scripts[-1][1] += data
        else:
            self.text.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def _hostile(tag: str) -> str:
    return f"{HOSTILE}{tag}"


def _with_hostile_strings(graph: dict, metrics: dict, points: list[str]) -> tuple[dict, dict, dict[str, str]]:
    """``graph`` and ``metrics`` with every shown string replaced by a hostile one; ``{field: string}``."""
    names = {f"layer {p}": _hostile(f"L{i}") for i, p in enumerate(points)}
    text = json.dumps({"graph": graph, "metrics": metrics})
    for p, new in zip(points, names.values()):  # layer names: keys, values and "a->b" keys alike
        text = text.replace(p, json.dumps(new)[1:-1])
    both = json.loads(text)
    graph, metrics = both["graph"], both["metrics"]
    for key in ("arch", "weights", "dataset", "split"):
        graph["model"][key] = names[f"model {key}"] = _hostile(f"M-{key}")
    for key, value in graph["settings"].items():
        if isinstance(value, str):
            graph["settings"][key] = names[f"setting {key}"] = _hostile(f"S-{key}")
    graph["run_key"] = names["run key"] = _hostile("K")
    return graph, metrics, names


def _check_page(page: str, strings: dict[str, str]) -> None:
    parsed = _parse(page)
    scripts = [tag for tag, _ in parsed.tags if tag == "script"]
    data_elements = [s for s in parsed.scripts if s[0].get("type") == "application/json"]
    assert len(scripts) == len(data_elements) + 1, "a string opened or closed a <script> element"
    assert page.count("</script>") == len(scripts)
    for tag, attrs in parsed.tags:
        assert tag not in ("img", "b") or "onerror" not in attrs, (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    assert not any(tag == "b" for tag, _ in parsed.tags), "a string became a <b> element"
    data = json.dumps([json.loads(body) for _, body in data_elements], ensure_ascii=False)
    shown = "".join(parsed.text)
    for field, s in strings.items():
        assert s not in page, f"{field} is written into the page unescaped"
        assert s in shown or json.dumps(s, ensure_ascii=False)[1:-1] in data, f"{field} is lost from the page"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pipe, out = finished_run(tmp_path_factory)
    graph = json.loads((out / "graph.json").read_text(encoding="utf-8"))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return pipe, out, graph, metrics


def test_the_runs_own_report_keeps_class_names_as_data(run):
    _, out, _, _ = run
    _check_page((out / "report.html").read_text(encoding="utf-8"),
                {f"class {i}": name for i, name in enumerate(CLASS_NAMES)})


def test_every_shown_string_stays_data(run):
    pipe, _, graph, metrics = run
    graph, metrics, strings = _with_hostile_strings(graph, metrics, pipe.points)
    strings.update({f"class {i}": name for i, name in enumerate(CLASS_NAMES)})
    page = render_explorer(graph, metrics, None, max_images=2, title=_hostile("T"))
    strings["title"] = _hostile("T")
    _check_page(page, strings)
    shown = "".join(_parse(page).text)  # the summary writes these into HTML: back as text, not as markup
    for field in ("model arch", "model dataset", "run key", "title") + tuple(f"layer {p}" for p in pipe.points):
        assert strings[field] in shown, field
