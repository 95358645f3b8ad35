"""CMake presets -> CMAKE_ARGS, the cache key, preset choice, and the installed build."""

from __future__ import annotations

import json

import pytest

from tongyi_local import ConfigError, build
from tongyi_local.hardware import parse_system_info

ZEN4 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "avx2",
        "fma", "f16c"}


def test_presets_resolve_inheritance():
    presets = build.load_presets()
    assert {"zen4", "avx2", "native", "cuda"} <= set(presets)
    assert "base" not in presets  # hidden
    zen4 = presets["zen4"].cache_variables
    assert zen4["GGML_NATIVE"] == "OFF" and zen4["CMAKE_BUILD_TYPE"] == "Release"
    for flag in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI",
                 "GGML_AVX2", "GGML_FMA", "GGML_F16C"):
        assert zen4[flag] == "ON", flag
    assert presets["avx2"].cache_variables["GGML_AVX512"] == "OFF"
    assert presets["native"].cache_variables["GGML_NATIVE"] == "ON"
    assert presets["cuda"].cache_variables["GGML_CUDA"] == "ON"
    assert "-DGGML_AVX512=ON" in presets["zen4"].cmake_args


def test_cache_key_follows_preset_contents(tmp_path):
    data = json.loads(build.presets_file().read_text())
    path = tmp_path / "CMakePresets.json"
    path.write_text(json.dumps(data))
    before = build.load_presets(path)["zen4"].key
    assert before == build.load_presets()["zen4"].key
    for preset in data["configurePresets"]:
        if preset["name"] == "base":
            preset["cacheVariables"]["GGML_LLAMAFILE"] = "OFF"  # an inherited change counts too
    path.write_text(json.dumps(data))
    assert build.load_presets(path)["zen4"].key != before
    assert build.load_presets()["avx2"].key != before


def test_preset_choice_by_cpu():
    assert build.choose_preset(ZEN4 | {"sse4_2"}) == "zen4"
    assert build.choose_preset({"avx2", "fma", "f16c"}) == "avx2"
    assert build.choose_preset({"sse4_2"}) == "native"


def test_select_preset_precedence(monkeypatch):
    monkeypatch.setenv(build.PRESET_ENV, "avx2")
    assert build.select_preset().name == "avx2"
    assert build.select_preset("native").name == "native"
    monkeypatch.setenv(build.PRESET_ENV, "pentium")
    with pytest.raises(ConfigError, match="pentium.*zen4"):
        build.select_preset()


def test_broken_presets_file(tmp_path):
    path = tmp_path / "CMakePresets.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=str(path)):
        build.load_presets(path)


def test_installed_runtime_matches_the_recorded_preset():
    from tongyi_local.backends.runtime import system_info

    record = build.installed_build()
    assert record is not None, "run `tongyi-local build`: it records the preset it installed"
    preset = build.load_presets()[record["preset"]]
    assert record["key"] == preset.key  # the installed wheel was built from today's preset
    features = parse_system_info(system_info())
    expected_avx512 = preset.cache_variables.get("GGML_AVX512") == "ON"
    if preset.cache_variables.get("GGML_NATIVE") == "OFF":
        assert features.get("AVX512", False) == expected_avx512
        assert features.get("AVX2") is True


def test_an_interrupted_build_step_takes_its_whole_process_tree_with_it(tmp_path):
    """Compilers left running after Ctrl-C (or a timeout) would keep writing into the build
    directory beside the next build; the build step runs in its own process group."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = f"sleep {4242 + os.getpid() % 1000}"
    child = subprocess.Popen([sys.executable, "-c", (
        # a runner started in the background may hand SIGINT down ignored: take it back
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from tongyi_local.build import _run\n"
        f"_run(['bash', '-c', '{marker} & {marker} & wait'], 'a long build step')\n")],
        stderr=subprocess.PIPE, text=True)
    def sleeping() -> str:  # the build's own processes (not this test's command line)
        return subprocess.run(["pgrep", "-f", f"^{marker}"], capture_output=True,
                              text=True).stdout.strip()

    deadline = time.time() + 30
    while time.time() < deadline and len(sleeping().split()) < 2:
        time.sleep(0.1)
    assert len(sleeping().split()) == 2
    child.send_signal(signal.SIGINT)
    child.wait(timeout=30)
    time.sleep(0.5)
    assert sleeping() == "", "build processes outlived the interrupted step"
