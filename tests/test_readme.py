"""The README's Commands block against the commands themselves: each line names exactly the flags
that command's `--help` lists (besides --help and --debug, which every command has), so the
synopsis a newcomer reads cannot drift from what the parsers accept."""

import re
from pathlib import Path

import pytest

from vqlog.cli import main, sweep_main

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"--[a-z][a-z-]*")
COMMON = {"--help", "--debug"}


def synopsis() -> dict[str, set[str]]:
    """Command ("vqlog train", "vqlog-sweep", ...) -> the flags its lines in the block name."""
    block = README.read_text().split("## Commands", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    flags: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        line = line.split("  # ", 1)[0]  # a trailing comment
        if line.startswith("vqlog"):
            words = line.split()
            command = words[0] if words[0] == "vqlog-sweep" else " ".join(words[:2])
            flags.setdefault(command, set())
        flags[command] |= set(FLAG.findall(line))
    return flags


def help_flags(command: str, capsys) -> set[str]:
    argv = command.split()[1:] + ["--help"]
    with pytest.raises(SystemExit) as done:
        (sweep_main if command == "vqlog-sweep" else main)(argv)
    assert done.value.code == 0
    usage = capsys.readouterr().out.split("\n\n", 1)[0]  # the usage paragraph
    return set(FLAG.findall(usage)) - COMMON


def test_the_commands_block_lists_every_command_once():
    names = set(synopsis())
    assert {"vqlog-sweep", "vqlog train", "vqlog table", "vqlog ui", "vqlog init", "vqlog export",
            "vqlog encode", "vqlog best", "vqlog trials"} <= names, names


@pytest.mark.parametrize("command", sorted(set(synopsis()) - {"vqlog sweep"}))
def test_the_commands_block_names_exactly_the_flags_of_each_command(command, capsys):
    assert synopsis()[command] == help_flags(command, capsys)
