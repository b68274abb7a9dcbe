"""The command registry: bad input (an InputError) ends every command with one line on stderr and
exit status 2; a bug keeps its traceback."""
import errno
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dad3dlib import REPO_ROOT, cli, config, data, errors, settings


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
    config.save_params(settings.deep_merge(config.run_params("smoke"), changes), path)
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
    (["evaluate", "--checkpoint", "{tmp}/text.ckpt"], "text.ckpt: cannot read checkpoint (UnpicklingError: "),
    (["evaluate", "--checkpoint", "{tmp}/weights.ckpt"], "weights.ckpt: not a training checkpoint"),
    (["show-head", "--out", "{tmp}/head.png", "--flame-assets", "{tmp}/flame"],
     "flame/generic_model.pkl: refused to unpickle: pickle data was truncated"),
    (["show-data", "--data", "{tmp}/data", "--out", "{tmp}/grid.png"], "train.json: malformed split file"),
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
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "weights.ckpt")  # weights, not a training checkpoint
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame" / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": list(range(99))})[:20])
    (tmp_path / "data" / "DAD-3DHeadsDataset" / "train").mkdir(parents=True)
    (tmp_path / "data" / "DAD-3DHeadsDataset" / "train" / "train.json").write_text("[{")
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
    assert cli.is_input_error(_raised(data.read_split, tmp_path / "train.json"))  # our check
    assert cli.is_input_error(_raised(open, tmp_path / "missing.txt"))  # the system's refusal, naming its file
    assert cli.is_input_error(OSError(errno.ENOSPC, "cannot write out.json: No space left on device"))
    assert not cli.is_input_error(_raised(data.crop_affine, [1, 2], (0,) * 4, 64))  # a bug in our code
    assert not cli.is_input_error(_raised(np.zeros(3).reshape, 2))  # numpy's own error
    assert not cli.is_input_error(OSError("not from the system"))


def test_input_errors_are_caught_as_before():
    """Each input error is also the built-in error its checks raised before the family existed."""
    assert issubclass(errors.ParamsError, ValueError) and issubclass(errors.InputFileNotFound, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        data.read_split(Path("/nonexistent/train.json"))


def _failing_command(error: BaseException):
    def command(argv):
        raise error
    return command


def test_an_input_error_is_one_line_wherever_it_is_raised(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_entry", lambda name: _failing_command(errors.InputValueError("x.yaml: bad\nvalue")))
    assert cli.main(["show-data"]) == 2
    assert capsys.readouterr().err == "error: x.yaml: bad value\n"


@pytest.mark.parametrize("bug", [ValueError("not enough values to unpack"), KeyError("global_step"),
                                 RuntimeError("shape mismatch"), OSError("no errno: not the system's")])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    monkeypatch.setattr(cli, "_entry", lambda name: _failing_command(bug))
    with pytest.raises(type(bug)):
        cli.main(["show-data"])


def test_a_bug_in_a_command_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_entry", lambda name: lambda argv: data.crop_affine([1, 2], (0,) * 4, 64))
    with pytest.raises(ValueError, match="not enough values to unpack"):
        cli.main(["show-data"])


def test_no_bytecode_inspection_and_no_broad_handler_without_a_reason():
    """Input errors are told by their class, never by reading bytecode; there is no bare ``except:``,
    and each ``except Exception`` says on its line why catching everything is right there."""
    package = Path(data.__file__).parent
    lines = [(f"{p.name}:{k}", line) for p in sorted(package.glob("*.py"))
             for k, line in enumerate(p.read_text().splitlines(), 1)]
    assert [where for where, line in lines if re.search(r"\bdis\.|co_code|^import dis\b", line)] == []
    assert [where for where, line in lines if re.search(r"except\s*:|except (Base)?Exception\b[^#]*$", line)] == []
