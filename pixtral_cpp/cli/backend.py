"""`pixtral-cpp backend`: what the installed llama.cpp can do, and rebuilding it for another backend."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from pixtral_cpp.build_presets import (
    check_toolchain,
    get_preset,
    install_command,
    load_presets,
    parse_define,
    run_install,
    toolchain_problems,
    with_overrides,
)

if TYPE_CHECKING:
    from pixtral_cpp.backend.build_info import InstalledBackend, NativeDevice


@click.group(invoke_without_command=True)
@click.pass_context
def backend(ctx: click.Context) -> None:
    """What the installed llama.cpp can do (default), or rebuild it for CPU, Metal, CUDA or Vulkan."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(info)


@backend.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(as_json: bool) -> None:
    """Build info, GPU offload, the devices llama.cpp sees, and the preset the build matches."""
    from pixtral_cpp.backend.build_info import installed_backend  # loads llama.cpp's libraries

    report = installed_backend()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(format_backend_info(report))
    click.echo(f"{'presets':<18}{', '.join(load_presets())} (pixtral-cpp backend install PRESET)")


@backend.command()
@click.argument("preset_name", metavar="PRESET")
@click.option("--print", "print_only", is_flag=True, help="Print the command instead of running it.")
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE",
              help="Set or override one CMake cache variable, e.g. CMAKE_CUDA_ARCHITECTURES=86-real.")
def install(preset_name: str, print_only: bool, defines: tuple[str, ...]) -> None:
    """Rebuild the pinned llama-cpp-python from source with PRESET's flags from CMakePresets.json.

    PRESET: cpu (portable), cpu-native, metal, cuda or vulkan. Takes minutes (CUDA: longer).
    """
    preset = with_overrides(get_preset(preset_name), [parse_define(d) for d in defines])
    command = install_command(preset)
    if print_only:
        # The command is worth seeing on any machine; say what running it here would lack.
        for problem in toolchain_problems(preset):
            click.echo(f"note: {problem}", err=True)
        click.echo(command.shell_line())
        return
    check_toolchain(preset)
    click.echo(f"rebuilding llama-cpp-python for the {preset.name} preset:", err=True)
    click.echo(f"  {command.shell_line()}", err=True)
    run_install(command)
    click.echo("done: `pixtral-cpp backend` shows what the new build can do", err=True)


def format_backend_info(report: InstalledBackend) -> str:
    """The report as aligned 'label  value' lines."""
    rows = [
        ("llama-cpp-python", f"{report.llama_cpp_python} (ggml {report.ggml_version}, "
                             f"commit {report.ggml_commit})"),
        ("system info", report.system_info),
        ("GPU offload", "yes" if report.gpu_offload else "no"),
        ("backends", ", ".join(report.registries)),
        *(("devices" if i == 0 else "", _device(d)) for i, d in enumerate(report.devices)),
        ("preset", f"{report.preset.name or 'none'} ({report.preset.reason})"),
    ]
    if not report.devices:
        rows.insert(4, ("devices", "none"))
    return "\n".join(f"{label:<18}{value}" for label, value in rows)


def _device(device: NativeDevice) -> str:
    line = f"{device.name:<10}{device.type:<6}{device.description}"
    if not device.memory_total:  # the backend does not say
        return line
    gib = 1024**3
    line += f", {device.memory_total / gib:.1f} GiB"
    # The CPU device reports total memory as free; GPUs report what is free now.
    if device.memory_free != device.memory_total:
        line += f" ({device.memory_free / gib:.1f} GiB free)"
    return line
