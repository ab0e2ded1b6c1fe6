"""A persona's recommended chat settings (its manifest's "sampling") written from the CLI and core: saved
atomically under the library's lock, validated like the chat flags, shown by `tailor adapters show`, and then used by
`tailor chat` (a flag still wins), `tailor serve` and the Ollama export."""

from __future__ import annotations

import json

import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.chat import ChatSession, recommend_sampling
from app.core.errors import TailorError
from app.core.library import MANIFEST_NAME, Library


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base) -> Library:
    library = Library(tmp_path_factory.mktemp("sampling-library"))
    make_random_adapters(library, tiny_base, ["alpha", "beta"], system_prompt="You are terse.")
    return library


@pytest.fixture(autouse=True)
def no_recommendations(library):
    for name in ("alpha", "beta"):
        recommend_sampling(library, name, None)


def tailor(library: Library, *args: str) -> int:
    return main(["--library", str(library.root), *args])


def manifest(library: Library, name: str) -> dict:
    return json.loads((library.get(name).path / MANIFEST_NAME).read_text())


def test_set_sampling_saves_merges_and_clears_and_show_prints_it(library, capsys):
    before = manifest(library, "alpha")
    assert "sampling" not in before
    assert tailor(library, "adapters", "show", "alpha") == 0
    assert "Recommended chat settings: none saved, so Tailor's defaults" in capsys.readouterr().out

    assert tailor(library, "adapters", "set-sampling", "alpha", "--temperature", "0.3", "--top-k", "20") == 0
    assert "'alpha' now recommends: temperature 0.3, top p 0.9 (default), top k 20" in capsys.readouterr().out
    assert manifest(library, "alpha") == {**before, "sampling": {"temperature": 0.3, "top_k": 20}}, \
        "only the sampling changed; the rest of the manifest is as it was"
    assert tailor(library, "adapters", "set-sampling", "alpha", "--repetition-penalty", "1.2") == 0
    assert manifest(library, "alpha")["sampling"] == {"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.2}, \
        "a second call adds to what is saved"
    assert library.get("alpha").sampling == {"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.2}
    capsys.readouterr()
    assert tailor(library, "adapters", "show", "alpha") == 0
    assert ("Recommended chat settings: temperature 0.3, top p 0.9 (default), top k 20, repetition penalty 1.2"
            in capsys.readouterr().out)

    assert tailor(library, "adapters", "set-sampling", "alpha", "--clear") == 0
    assert manifest(library, "alpha") == before, "--clear removes the key, back to Tailor's defaults"
    assert not list(library.get("alpha").path.glob(".*.partial")), "no temporary file is left behind"


@pytest.mark.parametrize(("args", "said"), [
    (("ghost", "--temperature", "0.5"), "No adapter named 'ghost'"),
    (("alpha", "--temperature", "9"), "Temperature must be 0 (greedy) or more, up to 5, not 9."),
    (("alpha", "--top-p", "0"), "Top-p must be more than 0 and at most 1, not 0."),
    (("alpha", "--top-k", "-1"), "Top-k must be 0 (no limit) or more, not -1."),
    (("alpha", "--repetition-penalty", "0.5"), "Repetition penalty must be between 1 (off) and 3, not 0.5."),
    (("alpha",), "Nothing to save: no setting was given."),
    (("alpha", "--clear", "--top-k", "5"), "or --clear, not both."),
])
def test_bad_input_exits_2_with_the_reason_and_leaves_the_manifest_alone(library, capsys, args, said):
    recommend_sampling(library, "alpha", {"temperature": 0.4})
    before = (library.get("alpha").path / MANIFEST_NAME).read_bytes()
    assert tailor(library, "adapters", "set-sampling", *args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert (library.get("alpha").path / MANIFEST_NAME).read_bytes() == before


def test_core_refuses_a_key_it_does_not_know(library):
    with pytest.raises(TailorError, match="'seed' is not a decoding setting"):
        recommend_sampling(library, "alpha", {"seed": 3})
    assert library.get("alpha").sampling is None


def test_a_value_chat_would_ignore_is_not_kept_when_saving_another(library):
    from app.core.library import write_json_atomic

    entry = library.get("beta")
    write_json_atomic(entry.path / MANIFEST_NAME, {**entry.manifest, "sampling": {"top_p": "high", "mystery": 1,
                                                                                  "top_k": 30}})
    assert recommend_sampling(library, "beta", {"temperature": 0.2}).sampling == {"top_k": 30, "top_p": 0.9,
                                                                                   "temperature": 0.2}


def test_tailor_chat_uses_the_saved_settings_and_a_flag_still_wins(library, capsys):
    def chat(*extra: str) -> tuple[str, str]:
        assert tailor(library, "chat", "--adapter", "alpha", "--prompt", "Hi", "--max-new-tokens", "8", "--seed", "5",
                      *extra) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err

    default_out, said = chat()
    assert "Decoding: temperature 0.7, top-p 0.9, top-k 40, repetition penalty 1.1" in said
    assert tailor(library, "adapters", "set-sampling", "alpha", "--temperature", "1.5", "--top-p", "1",
                  "--top-k", "0", "--repetition-penalty", "1.3") == 0
    capsys.readouterr()
    out, said = chat()
    assert "Decoding: temperature 1.5, top-p 1, top-k off, repetition penalty 1.3" in said, "no flag: the saved ones"
    assert out.strip() and out == chat("--temperature", "1.5", "--top-p", "1", "--top-k", "0",
                                       "--repetition-penalty", "1.3")[0], "the same reply as with those flags given"
    assert out != default_out, "and not the reply of the defaults"
    assert "Decoding: temperature 0.9, top-p 1, top-k off, repetition penalty 1.3" in chat("--temperature", "0.9")[1], \
        "an explicit flag wins over the saved setting, the others stay"


def test_serve_and_the_ollama_export_read_the_saved_settings(library, tiny_base, tmp_path, capsys):
    from app.core.serving import ServingEngine

    assert tailor(library, "adapters", "set-sampling", "beta", "--temperature", "0.25", "--top-p", "0.8",
                  "--top-k", "12") == 0
    engine = ServingEngine(ChatSession(str(tiny_base), "none"), library)
    settings = engine.settings_for("beta", {})
    assert (settings.temperature, settings.top_p, settings.top_k, settings.repetition_penalty) == (0.25, 0.8, 12, 1.1)
    assert engine.settings_for("beta", {"temperature": 1.0}).temperature == 1.0, "a request's own value wins"

    assert tailor(library, "export", "beta", "--format", "ollama", "--out", str(tmp_path / "beta-ollama")) == 0
    lines = (tmp_path / "beta-ollama" / "Modelfile").read_text().splitlines()
    for parameter in ("temperature 0.25", "top_p 0.8", "top_k 12", "repeat_penalty 1.1"):
        assert f"PARAMETER {parameter}" in lines
