"""GPU offload as requested, and what this (CPU) build actually does with a request."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pixtral_cpp.cli import main
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.placement import plan_placement


@pytest.mark.parametrize("layers,vision,expected", [
    (0, None, (0, False)),  # CPU
    (-1, None, (41, True)),  # everything: 40 blocks and the output layer; vision follows the text
    (20, False, (20, False)),  # a partial offload, vision kept on the CPU
    (99, None, (41, True)),
    (0, True, (0, True)),  # only the vision encoder on the GPU
])
def test_plan_on_a_gpu_build(layers, vision, expected):
    placement = plan_placement(layers, vision, block_count=40, gpu_offload=True)
    assert (placement.text_layers_on_gpu, placement.vision_on_gpu) == expected
    assert placement.offloadable_layers == 41


def test_a_cpu_build_runs_on_the_cpu_and_says_so(caplog):
    placement = plan_placement(-1, None, block_count=40, gpu_offload=False)
    assert (placement.text_layers_on_gpu, placement.vision_on_gpu) == (0, False)
    assert "no GPU backend" in caplog.text
    assert placement.describe() == "0/41 text layers on the GPU, vision encoder on the CPU"


def test_statistics_say_where_it_ran(converted):
    with PixtralModel.load(converted("F16", "F16")[0], options=ModelOptions(n_ctx=1024, threads=2,
                                                                         gpu_layers=-1)) as model:
        assert model.placement.gpu_offload is False  # this CI build is CPU-only
        result = model.chat([{"role": "user", "content": "Hello"}], max_tokens=2)
    assert (result.stats.text_layers_on_gpu, result.stats.vision_on_gpu) == (0, False)


def test_cli_json_reports_placement(converted, tmp_path):
    from PIL import Image

    image = tmp_path / "i.png"
    Image.new("RGB", (32, 32), "red").save(image)
    result = CliRunner().invoke(main, ["describe", str(image), "--model", str(converted("F16", "F16")[0]),
                                       "--gpu-layers", "-1", "--vision-gpu", "--json", "--max-tokens", "2",
                                       "--ctx", "1024"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output.strip().splitlines()[-1])["stats"]
    assert stats["text_layers_on_gpu"] == 0 and stats["vision_on_gpu"] is False
