"""Inputs that would exhaust the machine or pass unnoticed, refused or reported through the `mft` command: a YAML
anchor bomb, records over data.max_record_bytes, values validate must catch, FIFOs as task paths, damaged
tokenisation cache entries, samples dropped or truncated, a full disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cli

ANCHOR_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9)
) + "some_unknown_key: [*j, *j, *j, *j, *j, *j, *j, *j, *j, *j]\n"  # 10**11 strings once expanded


def test_yaml_anchor_bomb_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(ANCHOR_BOMB)
    assert cli.main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"config error: {config}: its aliases (*name) expand to more than 1,000,000 values" in err, err
    # An override is bounded the same way.
    flow = "{" + ANCHOR_BOMB.strip().replace("\n", ", ") + "}"
    (tmp_path / "small.yaml").write_text("seed: 1\n")
    assert cli.main(["validate", "--config", str(tmp_path / "small.yaml"), f"data.seq_len={flow}"]) == 1
    assert "config error: override data.seq_len: its aliases (*name) expand" in capsys.readouterr().err
