"""The chat pane's "Serve to other apps" switch: a real server started off the GUI thread on a real 4-bit tiny
model, answering the real `openai` client; copyable snippets; stopping frees the port; a port in use is a message."""

from __future__ import annotations

import socket
import time

import openai
import pytest
from adapter_factory import make_random_adapters
from PySide6.QtGui import QGuiApplication

from app.core.library import Library
from app.gui.chat_pane import ChatPane

START_TIMEOUT_MS = 180_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pane(qtbot, library, tiny_base):
    make_random_adapters(library, tiny_base, ["alpha", "beta"], system_prompt="You are terse.")
    pane = ChatPane(library)
    qtbot.addWidget(pane)
    pane.base_combo.setCurrentText(str(tiny_base))
    pane.quant_combo.setCurrentText("4bit")
    pane.serve_panel.port.setValue(free_port())
    pane.resize(1100, 760)
    pane.show()
    yield pane
    pane.shutdown()


def test_switch_serves_the_personas_to_the_openai_client_and_stops(qtbot, pane, tmp_path):
    panel = pane.serve_panel
    states = []
    panel.state_changed.connect(states.append)
    started = time.perf_counter()
    panel.switch.setChecked(True)
    assert time.perf_counter() - started < 0.5, "the model loads on a worker thread, not the GUI thread"
    assert not panel.switch.isEnabled() and "loading" in panel.status.text()
    qtbot.waitUntil(lambda: states[-1:] == ["serving"], timeout=START_TIMEOUT_MS)

    url = panel.url
    assert url == f"http://127.0.0.1:{panel.port.value()}/v1" and url in panel.status.text()
    assert "alpha" in panel.status.text() and "beta" in panel.status.text()
    assert f'base_url="{url}"' in panel.python_box.toPlainText() and '"alpha"' in panel.python_box.toPlainText()
    assert f"curl {url}/chat/completions" in panel.curl_box.toPlainText()
    panel.copy_buttons[1].click()
    assert QGuiApplication.clipboard().text() == panel.curl_box.toPlainText()

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    assert {model.id for model in client.models.list()} == {"base", "alpha", "beta"}
    reply = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0)
    assert reply.usage.completion_tokens >= 1

    shot = tmp_path / "serve.png"
    assert pane.grab().save(str(shot)) and shot.stat().st_size > 10_000

    panel.switch.setChecked(False)
    qtbot.waitUntil(lambda: states[-1:] == ["off"], timeout=60_000)
    assert not panel.snippets.isVisible() and panel.port.isEnabled()
    with socket.socket() as sock:  # nothing listens any more: the port can be served again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", panel.port.value()))
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_a_port_in_use_turns_the_switch_back_off_with_the_reason(qtbot, pane):
    panel = pane.serve_panel
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        panel.port.setValue(taken.getsockname()[1])
        states = []
        panel.state_changed.connect(states.append)
        panel.switch.setChecked(True)
        qtbot.waitUntil(lambda: states[-1:] == ["off"], timeout=30_000)
    assert not panel.switch.isChecked() and panel.switch.isEnabled()
    assert "Could not start" in panel.status.text() and "Pick another --port" in panel.status.text()


def live_sessions() -> list:
    import gc

    from app.core.chat import ChatSession

    gc.collect()
    return [thing for thing in gc.get_objects() if isinstance(thing, ChatSession)]


def start_serving(qtbot, panel) -> None:
    states = []
    panel.state_changed.connect(states.append)
    panel.switch.setChecked(True)
    qtbot.waitUntil(lambda: states[-1:] == ["serving"], timeout=START_TIMEOUT_MS)


def stop_serving(qtbot, panel) -> None:
    states = []
    panel.state_changed.connect(states.append)
    panel.switch.setChecked(False)
    qtbot.waitUntil(lambda: states[-1:] == ["off"], timeout=60_000)


def test_chat_and_server_share_one_loaded_model_whichever_starts_first(qtbot, pane):
    """One base in memory for the chat and the server: the server takes the chat's session, the chat takes the
    server's, and either one stopping leaves the other working on it."""
    assert live_sessions() == [], "the server stopped in the tests before freed its model"
    pane.open_persona("alpha")
    qtbot.waitUntil(lambda: pane._worker is not None and pane._worker._session is not None, timeout=START_TIMEOUT_MS)
    chat_session = pane._worker._session
    panel = pane.serve_panel
    start_serving(qtbot, panel)
    assert panel.server.engine.session is chat_session
    assert live_sessions() == [chat_session], "one model in memory, not one for the chat and one for the server"
    client = openai.OpenAI(base_url=panel.url, api_key="unused", max_retries=0, timeout=60)
    assert client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0).usage.completion_tokens >= 1

    # Training asks the chat to let go: the server still holds the model, and the chat says so.
    pane.set_training_active(True)
    qtbot.waitUntil(lambda: "still serves it" in pane.status.text(), timeout=30_000)
    assert pane._worker._session is None
    assert client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0).usage.completion_tokens >= 1
    # After training, the chat's next need for a model takes the server's, with its personas already loaded.
    pane.set_training_active(False)
    pane.open_persona("beta")
    qtbot.waitUntil(lambda: pane._worker._session is not None, timeout=START_TIMEOUT_MS)
    assert pane._worker._session is chat_session and live_sessions() == [chat_session]

    stop_serving(qtbot, panel)
    assert live_sessions() == [chat_session], "the chat still uses it"
    pane.shutdown()
    del chat_session
    assert live_sessions() == [], "nobody holds it any more: freed"


def test_the_server_loads_the_model_the_chat_then_uses(qtbot, pane):
    panel = pane.serve_panel
    start_serving(qtbot, panel)
    served = panel.server.engine.session
    pane.open_persona("alpha")
    qtbot.waitUntil(lambda: pane._worker is not None and pane._worker._session is not None, timeout=START_TIMEOUT_MS)
    assert pane._worker._session is served and live_sessions() == [served]
    stop_serving(qtbot, panel)
    assert pane._worker._session is served and live_sessions() == [served], "the chat keeps it"
