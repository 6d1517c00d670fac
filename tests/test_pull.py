"""`pull`, `models`, `--model user/repo:QUANT` and the first run, offline (HF_HUB_OFFLINE=1) against a local
Hugging Face cache laid out like ggml-org's and bartowski's repos (tests/hub_cache.py), with tiny real GGUFs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pixtral_cpp.cli import main
from pixtral_cpp.errors import ModelError, OutputError
from pixtral_cpp.hub_models import (
    HubPlan,
    RepoFile,
    RepoListing,
    check_disk_space,
    list_cached_repo,
    parse_hub_spec,
    plan_pull,
    pull,
)
from tests.fake_hub import FakeHub, FakeRepo, serve_hub
from tests.hub_cache import (
    BARTOWSKI,
    BARTOWSKI_PREFIX,
    COMMITS,
    GGML,
    TinyFiles,
    add_repo,
    build_hub_cache,
    interrupt_download,
    other_width_mmproj,
    repo_dir,
)


@pytest.fixture(scope="module")
def tiny(converted) -> TinyFiles:
    text, mmproj = converted("F16", "F16")
    return TinyFiles(text=text, text_q8=converted("Q8_0", "F16")[0], mmproj=mmproj)


@pytest.fixture
def cache(tiny, tmp_path, monkeypatch) -> Path:
    """A fresh offline cache per test; no converted models, no $PIXTRAL_CPP_MODEL."""
    hub = build_hub_cache(tmp_path / "hf-cache", tiny)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIXTRAL_CPP_MODELS", str(tmp_path / "models"))
    monkeypatch.delenv("PIXTRAL_CPP_MODEL", raising=False)
    monkeypatch.delenv("PIXTRAL_CPP_YES", raising=False)
    return hub


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def snapshot(repo_id: str, cache: Path) -> Path:
    return repo_dir(cache, repo_id) / "snapshots" / COMMITS[repo_id]


def test_spec_parsing():
    assert parse_hub_spec("ggml-org/pixtral-12b-GGUF") == parse_hub_spec(GGML)
    assert parse_hub_spec(GGML).revision is None and parse_hub_spec(GGML + "@") is None
    spec = parse_hub_spec("user/repo@v1.0:q8_0")
    assert spec is not None and (spec.repo_id, spec.revision, spec.quant) == ("user/repo", "v1.0", "q8_0")
    assert str(spec) == "user/repo@v1.0:q8_0"
    for not_a_spec in ("repo", "a/b/c", "./x/y", "user/model.gguf", "user/repo:Q4 K"):
        assert parse_hub_spec(not_a_spec) is None, not_a_spec


def test_pull_from_the_cache_takes_q4_k_m_and_checks_the_pair(cache):
    result = run("pull", GGML)
    assert result.exit_code == 0, result.output
    text, mmproj = snapshot(GGML, cache) / "pixtral-12b-Q4_K_M.gguf", snapshot(GGML, cache) / \
        "mmproj-pixtral-12b-f16.gguf"
    assert f"text model  {text}  (F16" in result.output and f"mmproj      {mmproj}  (F16" in result.output
    assert "from the local cache: already in the cache" in result.output
    assert "took pixtral-12b-Q4_K_M.gguf (the default Q4_K_M); also offered: Q8_0, F16" in result.output
    assert f"ready: pixtral-cpp describe IMAGE --model {GGML}" in result.output


def test_several_quants_by_tag_in_any_case(cache):
    pulled = pull(f"{BARTOWSKI}:q8_0")
    assert pulled.files.text.name == f"{BARTOWSKI_PREFIX}-Q8_0.gguf" and pulled.info.text.file_type == "Q8_0"
    assert pulled.files.mmproj.name == f"mmproj-{BARTOWSKI_PREFIX}-f16.gguf"
    assert pull(f"{BARTOWSKI}:Q5_K_M").files.text.name == f"{BARTOWSKI_PREFIX}-Q5_K_M.gguf"
    # the default skips the importance matrix that sorts first
    assert pull(BARTOWSKI).files.text.name == f"{BARTOWSKI_PREFIX}-Q4_K_M.gguf"
    result = run("pull", f"{BARTOWSKI}:IQ2_XS")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: no IQ2_XS text model in {BARTOWSKI} (local cache); it holds ")
    assert f"{BARTOWSKI_PREFIX}-Q5_K_M.gguf" in result.output


def test_a_split_model_brings_every_shard_and_its_mmproj(cache):
    listing = list_cached_repo(BARTOWSKI, "main", cache)
    assert listing is not None
    plan = plan_pull(parse_hub_spec(f"{BARTOWSKI}:f32"), listing)
    assert [f.name for f in plan.text] == [f"{BARTOWSKI_PREFIX}-f32-00001-of-00002.gguf",
                                           f"{BARTOWSKI_PREFIX}-f32-00002-of-00002.gguf"]
    assert plan.mmproj.name == f"mmproj-{BARTOWSKI_PREFIX}-f16.gguf"
    assert plan.size_bytes == sum(listing.file(f.name).size for f in plan.files)


def test_a_revision_other_than_main(cache, tiny):
    add_repo(cache, "user/pixtral-GGUF", {"p-Q8_0.gguf": tiny.text_q8, "mmproj-p-F16.gguf": tiny.mmproj},
             commit="3" * 40, revision="v2")
    assert pull("user/pixtral-GGUF@v2").files.text.name == "p-Q8_0.gguf"
    assert pull(f"user/pixtral-GGUF@{'3' * 40}:Q8_0").files.text.name == "p-Q8_0.gguf"
    with pytest.raises(ModelError, match=r"user/pixtral-GGUF@main is not in the local Hugging Face cache"):
        pull("user/pixtral-GGUF")


def test_a_repo_without_mmproj(cache, tiny):
    add_repo(cache, "someone/pixtral-text-only-GGUF", {"p-Q4_K_M.gguf": tiny.text})
    result = run("pull", "someone/pixtral-text-only-GGUF")
    assert result.exit_code == 1
    assert "no mmproj (mmproj-*.gguf) beside p-Q4_K_M.gguf in someone/pixtral-text-only-GGUF" in result.output


@pytest.fixture(scope="module")
def wrong_mmproj(tmp_path_factory) -> Path:
    return other_width_mmproj(tmp_path_factory.mktemp("other-width"))


def test_a_pair_that_does_not_match_is_not_ready(cache, tiny, wrong_mmproj):
    add_repo(cache, "someone/pixtral-mixed-GGUF", {"p-Q4_K_M.gguf": tiny.text, "mmproj-p-f16.gguf": wrong_mmproj})
    result = run("pull", "someone/pixtral-mixed-GGUF")
    assert result.exit_code == 1 and "ready" not in result.output
    assert "mmproj-p-f16.gguf produces embeddings of width 512 but p-Q4_K_M.gguf expects 256" in result.output


def test_an_interrupted_download_is_not_taken_for_a_file(cache):
    left = interrupt_download(cache, GGML, "pixtral-12b-Q8_0.gguf", b"GGUF" + b"\0" * 100)
    listing = list_cached_repo(GGML, "main", cache)
    assert listing is not None and "pixtral-12b-Q8_0.gguf" not in listing.names and listing.interrupted == (left,)
    result = run("pull", f"{GGML}:Q8_0")
    assert result.exit_code == 1
    assert "no Q8_0 text model in ggml-org/pixtral-12b-GGUF (local cache)" in result.output
    assert "1 interrupted download(s)" in result.output and "are not used" in result.output
    assert left.read_bytes() == b"GGUF" + b"\0" * 100  # left alone, for huggingface_hub to replace
    assert run("pull", GGML).exit_code == 0  # the complete files still serve


def test_a_link_whose_blob_is_gone_is_not_a_file(cache):
    link = snapshot(GGML, cache) / "pixtral-12b-Q8_0.gguf"
    link.resolve().unlink()
    assert link.is_symlink() and not link.exists()
    listing = list_cached_repo(GGML, "main", cache)
    assert listing is not None and "pixtral-12b-Q8_0.gguf" not in listing.names


def test_a_truncated_file_in_the_cache_is_refused(cache, tiny):
    head = tiny.text.read_bytes()[: tiny.text.stat().st_size // 2]
    add_repo(cache, "someone/pixtral-cut-GGUF", {"p-Q4_K_M.gguf": head, "mmproj-p-f16.gguf": tiny.mmproj})
    with pytest.raises(ModelError, match="truncated"):
        pull("someone/pixtral-cut-GGUF")


def test_no_disk_space_is_refused_before_downloading(cache):
    """Sizes as the hub's metadata states them; the free space is what the disk really has."""
    free = shutil.disk_usage(cache).free
    files = (RepoFile("m-Q4_K_M.gguf", free), RepoFile("mmproj-m-f16.gguf", 1_000_000))
    listing = RepoListing("user/big-GGUF", "main", "4" * 40, files, from_cache=False)
    plan = HubPlan(parse_hub_spec("user/big-GGUF"), listing, files[:1], files[1])
    with pytest.raises(OutputError, match=r"pulling user/big-GGUF needs .* but .* has .* free; free some space"):
        check_disk_space(plan, cache)
    # what the cache already holds at that commit does not count
    add_repo(cache, "user/big-GGUF", {"m-Q4_K_M.gguf": b"x" * 10}, commit="4" * 40)
    assert check_disk_space(plan, cache) == 1_000_000


def converted_models_folder(tiny: TinyFiles, folder: Path) -> Path:
    folder.mkdir(parents=True)
    os.link(tiny.text, folder / "Pixtral-tiny-F16.gguf")
    os.link(tiny.mmproj, folder / "mmproj-Pixtral-tiny-F16.gguf")
    return folder


def test_models_lists_converted_and_cached_pairs(cache, tiny, wrong_mmproj, tmp_path):
    converted_models_folder(tiny, tmp_path / "models")
    add_repo(cache, "someone/pixtral-mixed-GGUF", {"p-Q4_K_M.gguf": tiny.text, "mmproj-p-f16.gguf": wrong_mmproj})
    add_repo(cache, "mistralai/Pixtral-12B-2409", {"params.json": b"{}"})  # a checkpoint: not listed
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "QUANTIZATIONS", "SIZE", "RUNS", "WHERE"]
    rows = {cells[0]: cells for line in lines[1:] if len(cells := re.split(r"\s{2,}", line)) == 5}
    assert rows["Pixtral-tiny"][1:2] == ["F16"] and rows["Pixtral-tiny"][3] == "ok"
    assert rows[GGML][1] == "Q4_K_M,Q8_0,F16" and rows[GGML][3] == "ok" and rows[GGML][4] == str(repo_dir(cache, GGML))
    assert rows[BARTOWSKI][1] == "Q4_K_M,Q5_K_M,Q8_0,F32" and rows[BARTOWSKI][3] == "ok"
    assert rows["someone/pixtral-mixed-GGUF"][3] == "no"
    assert "someone/pixtral-mixed-GGUF: mmproj-p-f16.gguf produces embeddings of width 512" in result.output
    assert "mistralai/Pixtral-12B-2409" not in result.output


def test_models_rm_asks_then_removes(cache, tiny, tmp_path):
    models = converted_models_folder(tiny, tmp_path / "models")
    result = run("models", "rm", GGML)
    assert result.exit_code == 1 and "needs confirmation: add --yes" in result.output
    assert repo_dir(cache, GGML).is_dir()
    result = run("models", "rm", GGML, "--yes")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"removed {GGML}: ") and not repo_dir(cache, GGML).exists()
    assert run("models", "rm", "pixtral-tiny", "--yes").exit_code == 0
    assert list(models.iterdir()) == []
    result = run("models", "rm", "nothing-here", "--yes")
    assert result.exit_code == 1 and "no local model named 'nothing-here'" in result.output


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_describe_with_a_hub_repo_and_quant_from_the_cache(cache, photo):
    result = CliRunner().invoke(main, ["describe", photo, "--model", f"{GGML}:Q8_0", "--max-tokens", "4",
                                       "--temperature", "0", "--ctx", "2048"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip()) > 0


def test_first_run_without_a_terminal_says_the_command(cache, photo):
    shutil.rmtree(repo_dir(cache, GGML))
    result = run("describe", photo)
    assert result.exit_code == 1
    assert "no model found" in result.output and "run `pixtral-cpp pull ggml-org/pixtral-12b-GGUF:Q4_K_M`" in \
        result.output


def test_without_model_a_pulled_default_is_found(cache, photo):
    from pixtral_cpp.model_sources import resolve_model

    resolved = resolve_model()
    assert resolved.files.text == snapshot(GGML, cache) / "pixtral-12b-Q4_K_M.gguf"
    assert "the default model ggml-org/pixtral-12b-GGUF:Q4_K_M" in resolved.origin


# -- the online path, against a hub on localhost (tests/fake_hub.py) -------------------------------------------


@pytest.fixture(scope="module")
def ggml_bytes(tiny) -> dict[str, bytes]:
    return {"pixtral-12b-Q4_K_M.gguf": tiny.text.read_bytes(), "mmproj-pixtral-12b-f16.gguf": tiny.mmproj.read_bytes()}


def run_online(hub: FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point in a fresh process (huggingface_hub reads HF_ENDPOINT at import)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "PIXTRAL_CPP_MODEL", "PIXTRAL_CPP_YES")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "online-cache"),
               PIXTRAL_CPP_MODELS=str(tmp_path / "no-models"), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([str(Path(sys.executable).with_name("pixtral-cpp")), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_online_pull_downloads_with_progress_and_records_the_revision(ggml_bytes, tmp_path):
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)})) as hub:
        proc = run_online(hub, tmp_path, "pull", GGML)
    assert proc.returncode == 0, proc.stderr
    assert f"{GGML} at {'5' * 40}: downloaded 149.6 MB" in proc.stdout
    # not a terminal: one line per file, with the speed
    assert re.search(r"^pixtral-12b-Q4_K_M\.gguf: 145\.0 MB in [\d.]+ s \([\d.]+ [KMG]?B/s\)$", proc.stderr, re.M)
    cache = tmp_path / "online-cache"
    assert (repo_dir(cache, GGML) / "refs" / "main").read_text() == "5" * 40
    link = repo_dir(cache, GGML) / "snapshots" / ("5" * 40) / "pixtral-12b-Q4_K_M.gguf"
    assert link.read_bytes() == ggml_bytes["pixtral-12b-Q4_K_M.gguf"]
    assert not list((repo_dir(cache, GGML) / "blobs").glob("*.incomplete"))


def test_an_interrupted_transfer_is_resumed_and_never_left_looking_finished(ggml_bytes, tmp_path):
    # cut after 25 MB: huggingface_hub reads 10 MB chunks, so it asks for the rest from byte 20971520
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)}, cut_after=25_000_000)) as hub:
        proc = run_online(hub, tmp_path, "pull", GGML)
    assert proc.returncode == 0, proc.stderr
    assert f"GET /{GGML}/resolve/main/pixtral-12b-Q4_K_M.gguf bytes=20971520-" in hub.requests, "\n".join(hub.requests)
    blobs = repo_dir(tmp_path / "online-cache", GGML) / "blobs"
    assert sorted(p.read_bytes() for p in blobs.iterdir()) == sorted(ggml_bytes.values())


def test_online_no_disk_space_is_refused_before_any_download(ggml_bytes, tmp_path):
    huge = {"pixtral-12b-Q4_K_M.gguf": 10**15}  # a petabyte, as the hub's metadata states it
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes, claimed_sizes=huge)})) as hub:
        proc = run_online(hub, tmp_path, "pull", GGML)
    assert proc.returncode == 1
    assert f"Error: pulling {GGML} needs 1000.0 TB" in proc.stderr and "free some space" in proc.stderr
    assert not any("/resolve/" in r for r in hub.requests)


def test_first_run_with_yes_pulls_the_default_then_answers(ggml_bytes, tmp_path, photo):
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)})) as hub:
        proc = run_online(hub, tmp_path, "describe", photo, "--yes", "--max-tokens", "3", "--temperature", "0",
                          "--ctx", "2048")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "pixtral-12b-Q4_K_M.gguf: 145.0 MB in" in proc.stderr
    assert (repo_dir(tmp_path / "online-cache", GGML) / "refs" / "main").is_file()


def test_a_killed_pull_leaves_no_file_that_looks_finished(ggml_bytes, tmp_path):
    cache = tmp_path / "online-cache"
    blobs = repo_dir(cache, GGML) / "blobs"
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)}, stall_after=25_000_000)) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.Popen([str(Path(sys.executable).with_name("pixtral-cpp")), "pull", GGML], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size >= 20_971_520 for p in blobs.glob("*.incomplete")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never got going"
            time.sleep(0.1)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
        hub.release.set()
    partial = list(blobs.glob("*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size < len(ggml_bytes["pixtral-12b-Q4_K_M.gguf"])
    assert not (repo_dir(cache, GGML) / "snapshots").exists() or not list((repo_dir(cache, GGML) /
                                                                           "snapshots").rglob("*.gguf"))
    # hub unreachable (nothing listens on port 9): the cache's listing, where the half file is no model
    offline = run_online(FakeHub({}, url="http://127.0.0.1:9"), tmp_path, "pull", GGML)
    assert offline.returncode == 1
    assert "no text model (*.gguf) in ggml-org/pixtral-12b-GGUF (local cache); it holds no .gguf file (1 " \
           "interrupted download(s) in" in offline.stderr
    # online again: downloaded anew, complete
    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)})) as hub:
        again = run_online(hub, tmp_path, "pull", GGML)
    assert again.returncode == 0, again.stderr
    text = repo_dir(cache, GGML) / "snapshots" / ("5" * 40) / "pixtral-12b-Q4_K_M.gguf"
    assert text.read_bytes() == ggml_bytes["pixtral-12b-Q4_K_M.gguf"]


def test_first_run_on_a_terminal_states_the_size_and_asks(ggml_bytes, tmp_path, photo):
    import pty

    with serve_hub(FakeHub({GGML: FakeRepo(ggml_bytes)})) as hub:
        env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "PIXTRAL_CPP_MODEL")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "online-cache"),
                   PIXTRAL_CPP_MODELS=str(tmp_path / "no-models"), HF_HUB_DISABLE_TELEMETRY="1")
        leader, follower = pty.openpty()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("pixtral-cpp")), "describe", photo],
                                stdin=follower, stdout=follower, stderr=follower, env=env)
        os.close(follower)
        seen = b""
        while b"Download it now?" not in seen:
            chunk = os.read(leader, 4096)
            assert chunk, seen
            seen += chunk
        os.write(leader, b"n\n")
        while proc.poll() is None or chunk:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the other side closed
                break
            seen += chunk
        proc.wait(60)
        os.close(leader)
    text = seen.decode()
    assert f"No model found. {GGML}:Q4_K_M (149.6 MB) can be downloaded into the Hugging Face cache" in text
    assert proc.returncode == 1 and "run `pixtral-cpp pull ggml-org/pixtral-12b-GGUF:Q4_K_M`" in text
    assert not (tmp_path / "online-cache" / "models--ggml-org--pixtral-12b-GGUF" / "snapshots").exists()


def test_pull_and_models_help_load_no_model_code():
    from tests.test_cli_startup import HEAVY, loaded, modules_loaded_by

    for command in ("pull", "models"):
        assert loaded(modules_loaded_by(command, "--help"), (*HEAVY, "huggingface_hub", "gguf")) == []


def test_the_library_takes_a_hub_spec_too(cache):
    from pixtral_cpp.model_files import find_model_files

    files = find_model_files(f"{GGML}:Q8_0", mmproj_quant="f16")
    assert files.text == snapshot(GGML, cache) / "pixtral-12b-Q8_0.gguf"
    assert files.mmproj == snapshot(GGML, cache) / "mmproj-pixtral-12b-f16.gguf"
    with pytest.raises(ModelError, match=r"no BF16 mmproj beside pixtral-12b-Q8_0\.gguf in ggml-org/pixtral-12b-GGUF "
                                         r"\(local cache\); offered: F16"):
        find_model_files(f"{GGML}:Q8_0", mmproj_quant="BF16")


def test_the_environment_variable_accepts_the_offer(cache, photo, monkeypatch):
    shutil.rmtree(repo_dir(cache, GGML))
    monkeypatch.setenv("PIXTRAL_CPP_YES", "1")
    result = run("describe", photo)  # accepted: it tries to pull, and offline the cache cannot serve it
    assert result.exit_code == 1
    assert "no model found" not in result.output
    assert "ggml-org/pixtral-12b-GGUF@main is not in the local Hugging Face cache" in result.output


# Repos as llama.cpp's converter publishes them (tests/quirky_files.py): today's (no [IMG_BREAK] in the mmproj,
# pre-tokenizer pixtral, no chat template) and one from before April 2025 (the std written as the mean).
LMSTUDIO = "lmstudio-community/pixtral-12b-GGUF"
OLD = "someone/pixtral-12b-2024-GGUF"


@pytest.fixture(scope="module")
def quirky_tiny(tiny, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    from tests.quirky_files import LLAMA_CPP_HF, OLD_LLAMA_CPP, write_quirky_pair

    root = tmp_path_factory.mktemp("quirky")
    return {repo: write_quirky_pair(tiny.text_q8, tiny.mmproj, root / name, quirks)
            for repo, name, quirks in ((LMSTUDIO, "today", LLAMA_CPP_HF), (OLD, "old", OLD_LLAMA_CPP))}


@pytest.fixture
def quirky_cache(cache, quirky_tiny, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIXTRAL_CPP_CORRECTED_DIR", str(tmp_path / "corrected"))
    for repo, (text, mmproj) in quirky_tiny.items():
        add_repo(cache, repo, {"pixtral-12b-Q8_0.gguf": text, "mmproj-pixtral-12b-f16.gguf": mmproj})
    return cache


def test_a_repo_from_llama_cpps_converter_is_ready_with_its_correction_named(quirky_cache, photo, tmp_path):
    result = run("pull", f"{LMSTUDIO}:Q8_0")
    assert result.exit_code == 0 and "ready" in result.output, result.output
    listed = run("models")
    row = next(line for line in listed.output.splitlines() if line.startswith(LMSTUDIO + " "))
    assert re.split(r"\s{2,}", row)[3] == "corrected"
    assert f"{LMSTUDIO}: the mmproj lacks v.token_embd.img_break" in listed.output
    answer = CliRunner().invoke(main, ["describe", photo, "--model", f"{LMSTUDIO}:Q8_0", "--max-tokens", "4",
                                       "--temperature", "0", "--ctx", "2048"])
    assert answer.exit_code == 0, answer.output
    assert list((tmp_path / "corrected").rglob("mmproj-pixtral-12b-f16.gguf"))  # the corrected copy it ran


def test_a_repo_with_the_std_written_as_the_mean_is_refused_with_the_fix(quirky_cache, photo):
    result = run("pull", f"{OLD}:Q8_0")
    assert result.exit_code == 1 and "ready" not in result.output
    assert "llama.cpp#13208" in result.output and "pixtral-cpp fix" in result.output
    listed = run("models")
    row = next(line for line in listed.output.splitlines() if line.startswith(OLD + " "))
    assert re.split(r"\s{2,}", row)[3] == "no"
    answer = CliRunner().invoke(main, ["describe", photo, "--model", f"{OLD}:Q8_0", "--max-tokens", "4"])
    assert answer.exit_code == 1 and "llama.cpp#13208" in answer.output
