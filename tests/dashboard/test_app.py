"""Every dashboard page under `streamlit.testing.v1.AppTest`, against the fake ingress.

Happy paths, then injected failures (400, 401, 500, 503, timeout, connection refused, broken
streams): each must leave zero exceptions in the app and one clear message in the page.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import ui
from dashboard.render import escape_markdown
from slimserve.net import free_port
from slimserve.protocol import ModelCard
from slimserve.reports import Chart, Table, new_report, write_report

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PAGES = {
    "chat": "views/chat.py",
    "compare": "views/compare.py",
    "models": "views/models.py",
    "benchmarks": "views/benchmarks.py",
}
# what each failure must say in the page (the title `ui.show_error` gives its kind)
SAYS = {
    "400": "The request was refused (HTTP 400)",
    "401": "Not authorised (HTTP 401)",
    "500": "The ingress reported an error (HTTP 500)",
    "503": "The ingress is overloaded (HTTP 503)",
    "timeout": "The ingress timed out",
    "refused": "Cannot reach the ingress",
}


@pytest.fixture
def ingress(fake_ingress, monkeypatch, tmp_path):
    monkeypatch.setattr(ui, "TRANSPORT", httpx.MockTransport(fake_ingress.handler))
    for var in ("SLIMSERVE_URL", "SLIMSERVE_API_KEY", "SLIMSERVE_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLIMSERVE_REPORTS_DIR", str(tmp_path / "reports"))
    return fake_ingress


def open_page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30).run()
    if name != "chat":
        at.switch_page(PAGES[name]).run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def notices(at: AppTest) -> str:
    return "\n".join(e.value for e in [*at.error, *at.warning, *at.info])


def markdown_sources(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="chat_prompt").set_value(text).run()
    assert_clean(at)
    return at


def test_no_streamlit_magic_in_page_scripts():
    """A bare non-call expression in a page script is written to the page by Streamlit's
    "magic" (AppTest does not show it; a browser does), e.g. `a() if x else b()`. Module and
    function docstrings are exempt (magic skips them; class docstrings it would show)."""
    scripts = [Path(APP), *(Path(APP).parent / "views").glob("*.py")]
    assert len(scripts) == 5
    for script in scripts:
        tree = ast.parse(script.read_text())
        docstrings = {
            id(node.body[0])
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                assert id(node) in docstrings, f"{script.name}:{node.lineno} is shown by magic"


def test_dashboard_imports_only_the_protocol_and_reports_from_the_core():
    """The dashboard talks HTTP; of the core it may use only these two modules."""
    allowed = {"slimserve.protocol", "slimserve.reports"}
    for script in Path(APP).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"torch", "ray", "transformers", "onnxruntime", "deployments"}
                if top == "slimserve":
                    assert name in allowed, f"{script.name} imports {name}"
    code = (
        "import sys, dashboard.client, dashboard.ui, dashboard.render, slimserve.reports;"
        "print(sorted({'torch', 'ray', 'transformers', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- Chat ----------------------------------------------------------------------------------


def test_chat_streams_a_reply_shown_as_text(ingress):
    at = send(open_page("chat"), "hi")
    texts = [t.value for t in at.text]
    assert texts == ["hi", ingress.REPLY_TEXT]
    # the reply's Markdown never reaches a Markdown element unescaped (no link, no bold)
    assert "](javascript" not in markdown_sources(at) and "**world**" not in markdown_sources(at)
    caption = at.caption[0].value
    assert caption.startswith("teacher · TTFT ") and "tokens/s" in caption
    assert "4 tokens" in caption and "finish: length" in caption
    body = ingress.bodies("/v1/chat/completions")[-1]
    assert body["model"] == "teacher" and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    send(at, "more")  # the conversation is kept and sent whole
    sent = ingress.bodies("/v1/chat/completions")[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == ingress.REPLY_TEXT
    assert [t.value for t in at.text] == ["hi", ingress.REPLY_TEXT, "more", ingress.REPLY_TEXT]


def test_chat_controls_reach_the_request(ingress):
    at = open_page("chat")
    at.selectbox(key="chat_model").set_value("student")
    at.slider(key="chat_temp").set_value(0.0)
    at.slider(key="chat_top_p").set_value(0.5)
    at.number_input(key="chat_top_k").set_value(7)
    at.number_input(key="chat_max").set_value(20)
    at.number_input(key="chat_seed").set_value(42)
    send(at.run(), "hello")
    body = ingress.bodies("/v1/chat/completions")[-1]
    assert body["model"] == "student"
    fields = ("temperature", "top_p", "top_k", "max_tokens", "seed")
    assert [body[k] for k in fields] == [0.0, 0.5, 7, 20, 42]
    assert at.number_input(key="chat_max").max == 127  # the variant's context - 1


def test_chat_only_offers_deployed_variants_and_clear_empties(ingress):
    at = send(open_page("chat"), "hi")
    assert at.selectbox(key="chat_model").options == ["teacher", "student"]
    assert len(at.session_state["chat_history"]) == 2
    at.button(key="chat_clear").click().run()
    assert_clean(at)
    assert at.session_state["chat_history"] == [] and not at.text


def test_chat_leaves_out_old_turns_when_the_context_is_full(ingress):
    at = send(open_page("chat"), "first")
    ingress.max_messages = 1
    send(at, "second")
    sent = [len(b["messages"]) for b in ingress.bodies("/v1/chat/completions")]
    assert sent == [1, 3, 1]
    assert "2 older messages left out" in at.caption[1].value
    assert not at.error


@pytest.mark.parametrize("failure", list(SAYS))
def test_chat_failures_are_messages(ingress, failure):
    at = open_page("chat")
    ingress.fail["/v1/chat/completions"] = failure
    send(at, "hi")
    assert SAYS[failure] in notices(at)
    if failure.isdigit():  # the ingress's own message is shown too
        assert f"injected {failure}" in notices(at)
    if failure == "503":
        assert "Retry after 2 s" in notices(at)
    assert at.session_state["chat_history"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("failure", ["midstream", "cut", "stall"])
def test_chat_broken_stream_keeps_the_partial_reply(ingress, failure):
    at = open_page("chat")
    ingress.fail["/v1/chat/completions"] = failure
    send(at, "hi")
    partial = "".join(ingress.REPLY[:2])
    assert [t.value for t in at.text] == ["hi", partial]
    assert "interrupted" in at.caption[0].value
    assert notices(at)  # and says why
    assert at.session_state["chat_history"][-1]["content"] == partial


def test_chat_with_nothing_deployed_says_so(ingress):
    ingress.models = [ModelCard(id="teacher", deployed=False, reason="not built")]
    ingress.message = "not built: run `make artifacts`"
    at = open_page("chat")
    assert "not built: run `make artifacts`" in notices(at)
    assert not at.chat_input


# ---- every page, ingress failing -----------------------------------------------------------


@pytest.mark.parametrize("failure", list(SAYS))
@pytest.mark.parametrize("page", ["chat", "compare", "models"])
def test_pages_explain_a_failing_ingress(ingress, page, failure):
    ingress.fail["*"] = failure
    at = open_page(page)
    assert SAYS[failure] in notices(at)
    assert "while listing the models" in notices(at)
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert ":red[●]" in sidebar


def test_a_real_closed_port_is_explained(monkeypatch, tmp_path):
    """No mock: real httpx against a local port nobody listens on."""
    port = free_port()  # nobody listens on it once free_port returns
    monkeypatch.setattr(ui, "TRANSPORT", None)
    monkeypatch.setenv("SLIMSERVE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SLIMSERVE_REPORTS_DIR", str(tmp_path))
    for page in PAGES:
        at = open_page(page)
        if page != "benchmarks":
            assert "Cannot reach the ingress" in notices(at)
            assert escape_markdown(f"127.0.0.1:{port}") in notices(at)


@pytest.mark.parametrize("failure", ["refused", "timeout", "503"])
def test_benchmarks_page_works_with_the_ingress_down(ingress, failure):
    ingress.fail["*"] = failure
    at = open_page("benchmarks")
    assert "No results yet: run `make bench`" in notices(at)


def test_sidebar_api_key_is_sent(ingress):
    at = open_page("models")
    at.sidebar.text_input(key="api_key").set_value("sk-test").run()
    assert_clean(at)
    assert ingress.requests[-1].headers["authorization"] == "Bearer sk-test"
    assert ":green[●]" in at.sidebar.caption[0].value


# ---- Compare -------------------------------------------------------------------------------


def run_compare(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Compare").click().run()
    assert_clean(at)
    return at


def test_compare_side_by_side_table_and_chart(ingress):
    at = run_compare(open_page("compare"))
    body = ingress.bodies("/compare")[-1]
    assert body["models"] == ["teacher", "student"] and body["temperature"] == 0.0
    assert [t.value for t in at.text] == [ingress.TEACHER_TEXT]  # the reference, plain
    assert "the :orange-background[dog] sat on the mat" in markdown_sources(at)
    table = at.dataframe[0].value
    assert list(table["variant"]) == ["teacher", "student"]
    assert list(table["speedup"]) == [1.0, 2.0] and list(table["agreement"]) == [1.0, 0.8]
    assert at.get("vega_lite_chart")  # the bar chart
    at.radio(key="compare_metric").set_value("latency (s)").run()  # the result persists
    assert_clean(at)
    assert len(at.dataframe) == 1 and at.get("vega_lite_chart")


def test_compare_escapes_model_markdown_and_shows_per_variant_errors(ingress):
    ingress.STUDENT_TEXT = "the **cat** <i>sat</i>"
    ingress.models = [*ingress.models, ModelCard(id="student-onnx", deployed=True)]
    at = run_compare(open_page("compare"))
    marked = next(m.value for m in at.markdown if "orange-background" in m.value)
    assert "cat" in marked and "sat" in marked
    assert not re.search(r"(?<!\\)[*<>]", marked)  # every Markdown / HTML character escaped
    assert escape_markdown("student-onnx is not deployed") in notices(at)  # server text, escaped


def test_compare_says_when_an_output_is_empty(ingress):
    ingress.STUDENT_TEXT = " \n "
    at = run_compare(open_page("compare"))
    assert any(c.value.startswith("(empty output: 6 tokens") for c in at.caption)


@pytest.mark.parametrize("failure", list(SAYS))
def test_compare_failures_are_messages(ingress, failure):
    at = open_page("compare")
    ingress.fail["/compare"] = failure
    run_compare(at)
    assert SAYS[failure] in notices(at) and "comparing the variants" in notices(at)
    assert not at.dataframe


def test_compare_needs_a_variant(ingress):
    at = open_page("compare")
    at.multiselect(key="compare_models").set_value([])
    run_compare(at)
    assert "Pick at least one variant" in notices(at)
    assert not ingress.bodies("/compare")


# ---- Models --------------------------------------------------------------------------------


def test_models_lineage_and_table(ingress):
    at = open_page("models")
    dot = at.get("graphviz_chart")[0].proto.spec
    assert '"teacher" -> "student"' in dot and '"student" -> "student-trt"' in dot
    table = at.dataframe[0].value
    assert list(table["variant"]) == ["teacher", "student", "student-trt"]
    assert table.loc[2, "why not deployed"] == "no NVIDIA GPU"
    assert table.loc[1, "sparsity"] == pytest.approx(0.5)
    assert list(table["params"]) == ["4M", "4M", "–"]
    assert "3 variants (profile `tiny`), 2 deployed" in at.caption[0].value


def test_models_when_nothing_is_built(ingress):
    ingress.models = []
    ingress.message = "not built: run `make artifacts`"
    at = open_page("models")
    assert "not built" in notices(at) and not at.dataframe


# ---- Benchmarks ----------------------------------------------------------------------------


def test_benchmarks_draws_every_report_and_flags_bad_files(ingress, tmp_path):
    folder = tmp_path / "reports"
    machine = {"cpu": "Test CPU", "cores": 2, "gpu": "none"}
    sweep = new_report(
        "prune-sweep", kind="prune-sweep", title="Prune sweep", machine=machine, command="x",
        tables=[Table(title="ppl", columns=["sparsity", "ppl"], rows=[[0.0, 40.0], [0.5, 42.0]])],
        charts=[Chart(title="ppl vs sparsity", type="line", x="sparsity", y=["ppl"])],
        notes=["a note"],
    )  # fmt: skip
    latency = new_report(
        "latency", kind="latency", title="Latency", machine=machine, command="y",
        tables=[Table(title="p50", columns=["variant", "ms"], rows=[["teacher", 9.0]])],
        charts=[Chart(title="ms", type="bar", x="variant", y=["ms"])],
    ).model_copy(update={"created": datetime(2020, 1, 1, tzinfo=UTC)})  # fmt: skip
    write_report(sweep, folder, png=False)
    write_report(latency, folder, png=False)
    (folder / "junk.json").write_text("{")
    at = open_page("benchmarks")
    assert [e.label for e in at.main.expander] == ["Prune sweep", "Latency"]  # newest first
    assert len(at.dataframe) == 2 and len(at.get("vega_lite_chart")) == 2
    assert "Test CPU, 2 cores, GPU none" in at.caption[0].value
    assert "junk.json" in notices(at) and "No results yet" not in notices(at)
    assert "- a note" in markdown_sources(at)
