"""The `zoo` command line."""

import json

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "r18.pth"
    result = runner.invoke(app, ["random-checkpoint", "resnet18", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_list():
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0
    names = [m["name"] for m in json.loads(result.output)]
    assert {"resnet18", "resnet50", "wide_resnet101_2", "resnext101_64x4d"} <= set(names)
    assert runner.invoke(app, ["list", "resnext*"]).exit_code == 0


def test_convert_info_verify(tmp_path, checkpoint):
    out = tmp_path / "r18.safetensors"
    args = ["convert", "resnet18", "--checkpoint", str(checkpoint), "--framework", "equinox", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.exists()

    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0

    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0
    summary = json.loads(info.output)
    assert summary["arch"] == "resnet18" and summary["framework"] == "equinox"
    assert summary["parameters"] == 11_689_512

    result = runner.invoke(app, ["verify", "resnet18", "--checkpoint", str(checkpoint), "--framework", "equinox",
                                 "--converted", str(out), "--batch", "2", "--size", "63", "81", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["rel"] <= 1e-5 and report["top1"] == 1.0
    assert report["size"] == [63, 81] and report["precision"] == "highest"


def test_verify_fold_bn_table(checkpoint):
    result = runner.invoke(app, ["verify", "resnet18", "-c", str(checkpoint), "-f", "haiku", "--fold-bn",
                                 "--batch", "1", "--size", "57", "64"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "top-1" in result.output


def test_errors_are_one_line_with_nonzero_exit(tmp_path, checkpoint):
    result = runner.invoke(app, ["convert", "resnet34", "-c", str(checkpoint), "-f", "haiku",
                                 "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "missing" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.safetensors").exists()

    missing = runner.invoke(app, ["info", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and missing.output.startswith("error:")

    debug = runner.invoke(app, ["--debug", "info", str(tmp_path / "nope.safetensors")])
    assert debug.exit_code != 0 and isinstance(debug.exception, FileNotFoundError)


def test_convert_needs_exactly_one_source(tmp_path):
    result = runner.invoke(app, ["convert", "resnet18", "-f", "haiku", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "--checkpoint" in result.output
