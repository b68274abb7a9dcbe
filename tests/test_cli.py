"""The command registry: bad input ends every command with one line on stderr and exit status 2;
a bug keeps its traceback."""
import subprocess
import sys

import numpy as np
import pytest

from dad3dlib import REPO_ROOT, cli, config, data


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dad3dlib", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _params_file(tmp_path, **changes):
    path = tmp_path / "params.yaml"
    config.save_params(config.deep_merge(config.run_params("smoke"), changes), path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"data": {"crop_size": 50}}, "params.yaml: data.crop_size must be a positive multiple of 32"),
    ({"data": {"root": "/nonexistent/data"}}, "/nonexistent/data: data directory not found"),
])
def test_train_reports_bad_params_and_data_in_one_line(tmp_path, changes, message):
    params = _params_file(tmp_path, **changes)
    assert message in _one_line_error(_command("train", "--params", str(params), "--out", str(tmp_path / "run")))


def test_show_data_reports_a_missing_split_file_in_one_line(tmp_path):
    (tmp_path / "DAD-3DHeadsDataset" / "train").mkdir(parents=True)
    line = _one_line_error(_command("show-data", "--data", str(tmp_path), "--out", str(tmp_path / "grid.png")))
    assert line.endswith("DAD-3DHeadsDataset/train/train.json: split file not found")


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--checkpoint", "/nonexistent/best.ckpt"], "/nonexistent/best.ckpt: cannot read checkpoint"),
    (["make-data", "--out", "{tmp}/d", "--flame-assets", "/nonexistent/flame", "--workers", "1"],
     "/nonexistent/flame: FLAME assets directory not found"),
    (["show-head", "--out", "{tmp}/head.png", "--flame-assets", "/nonexistent/flame"],
     "/nonexistent/flame: FLAME assets directory not found"),
    (["make-data", "--preset", "{tmp}/real.yaml", "--out", "{tmp}/d"], "real.yaml: no data.synthetic recipe"),
    (["make-data", "--preset", "{tmp}/bad.yaml", "--out", "{tmp}/d"],
     "bad.yaml: data.synthetic.sampling: unknown key(s) ['yaw']"),
])
def test_every_command_reports_bad_input_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "real.yaml").write_text("data: {root: /somewhere/real}\n")
    (tmp_path / "bad.yaml").write_text("data: {synthetic: {splits: {train: 2}, image_sizes: [[64, 64]], sampling: {yaw: 1}}}\n")
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except (ValueError, OSError) as e:
        return e
    raise AssertionError("no error")


def test_input_errors_are_told_from_bugs(tmp_path):
    assert cli.is_input_error(_raised(data.read_split, tmp_path / "train.json"))  # our check's raise
    assert cli.is_input_error(_raised(open, tmp_path / "missing.txt"))  # an OSError naming its file
    assert not cli.is_input_error(_raised(data.crop_affine, [1, 2], (0,) * 4, 64))  # a bug in our code
    assert not cli.is_input_error(_raised(np.zeros(3).reshape, 2))  # numpy's own error


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_entry", lambda name: lambda argv: data.crop_affine([1, 2], (0,) * 4, 64))
    with pytest.raises(ValueError, match="not enough values to unpack"):
        cli.main(["show-data"])
