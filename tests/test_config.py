"""Params files: presets × ablations, validation errors that name the file, run planning."""
import pytest

from dad3dlib import config, devices
from dad3dlib.errors import ParamsError
from dad3dlib.losses import LOSS_TERMS
from dad3dlib.settings import Settings, deep_merge


def test_every_ablation_of_the_study_plan_is_there():
    assert set(config.available("ablations")) >= {"baseline", "no_l3d", "no_lproj", "no_2d", "l3d50_proj0.5",
                                                  "l3d5_proj0.05", "l3d50_proj0.05"}
    assert {"smoke", "cpu", "paper"} <= set(config.available("presets"))


@pytest.mark.parametrize("ablation, lambdas", [
    ("baseline", {"l3d": 50, "l1": 100, "lproj": 0.05, "awing": 1}),
    ("no_l3d", {"l3d": 0, "l1": 100, "lproj": 0.05, "awing": 1}),
    ("no_lproj", {"l3d": 50, "l1": 100, "lproj": 0, "awing": 1}),
    ("no_2d", {"l3d": 50, "l1": 0, "lproj": 0.05, "awing": 0}),
    ("l3d50_proj0.5", {"l3d": 50, "l1": 100, "lproj": 0.5, "awing": 1}),
    ("l3d5_proj0.05", {"l3d": 5, "l1": 100, "lproj": 0.05, "awing": 1}),
])
def test_ablation_weights_match_the_study_plan(ablation, lambdas):
    p = config.run_params("smoke", ablation, seed=3)
    assert p["loss"]["lambdas"] == pytest.approx(lambdas)
    assert p["ablation"] == ablation and p["seed"] == 3 and p["preset"] == "smoke"


def test_unknown_ablation_lists_the_available_ones():
    with pytest.raises(ParamsError, match=r"unknown ablation 'no_such'.*baseline"):
        config.run_params("smoke", "no_such")


@pytest.mark.parametrize("text, match", [
    ("loss: {lambdas: {l3d: 1\n", "malformed YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("loss: {lambdas: {l3d: -1, l1: 1, lproj: 0, awing: 0}}\n", r"lambdas.l3d must be a finite number >= 0, got -1"),
    ("loss: {lambdas: {l3d: 0, l1: 0, lproj: 0, awing: 0}}\n", "all loss weights are zero"),
    ("loss: {lambdas: {l4d: 1}}\n", "unknown loss weight"),
    ("loss: {lambdas: {l3d: fifty, l1: 1, lproj: 0, awing: 0}}\n", "got 'fifty'"),
    ("loss: {lambdas: {l3d: 50, l1: 100, lproj: 0.05}}\n", r"loss.lambdas misses \['awing'\]"),
    ("loss: {lambdas: {l3d: .nan, l1: 100, lproj: 0.05, awing: 1}}\n", r"lambdas.l3d must be a finite .*nan"),
    ("loss: {lambdas: {l3d: 50, l1: 100, lproj: .inf, awing: 1}}\n", r"lambdas.lproj must be a finite .*inf"),
    ("trainer: {max_epochs: 1}\n", "an ablation may only set"),
    ("hypothesis: {mean_cm: worse}\n", r"hypothesis: unknown metric 'mean_cm'; known: median_mm"),
    ("hypothesis: {mean_mm: higher}\n", r"hypothesis.mean_mm must be worse or better, got 'higher'"),
    ("hypothesis: [mean_mm, worse]\n", r"hypothesis must map metrics to an expected direction"),
    ("optimiser: {}\n", "unknown section"),
    (b"name: caf\xe9\n", "malformed YAML"),  # Latin-1, not UTF-8
])
def test_malformed_ablation_file_is_reported_with_its_path(tmp_path, text, match):
    bad = tmp_path / "broken.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ParamsError, match=match) as e:
        config.run_params("smoke", bad)
    assert "broken.yaml" in str(e.value)


def test_every_ablation_lists_all_four_weights():
    for name in config.available("ablations"):
        lambdas = config.read_yaml(config.PARAMS_DIR / "ablations" / f"{name}.yaml")["loss"]["lambdas"]
        assert tuple(lambdas) == tuple(LOSS_TERMS), name


def _run_params_file(tmp_path, edit=lambda params: None):
    """A complete run's params, as written into a run directory, after ``edit(params)``."""
    params = config.run_params("smoke")
    edit(params)
    path = tmp_path / "run.yaml"
    config.save_params(params, path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.update(optimizer={"lr": 0.1}), r"unknown section\(s\) \['optimizer'\]"),
    (lambda p: p["data"].update(crop_size=50), r"data.crop_size must be a positive multiple of 32 .*got 50"),
    (lambda p: p["data"].update(crop_size=0), r"data.crop_size must be a positive multiple of 32 .*got 0"),
    (lambda p: p["data"].update(batch_size=0), r"data.batch_size must be an integer >= 1, got 0"),
    (lambda p: p["data"].update(holdout_fraction=1), r"data.holdout_fraction must be a number between 0 and 1, got 1"),
    (lambda p: p["optim"].update(lr=0), r"optim.lr must be a finite number > 0, got 0"),
    (lambda p: p["optim"].update(lr=float("nan")), r"optim.lr must be a finite number > 0, got nan"),
    (lambda p: p["optim"].update(lr="1e-4"), r"optim.lr must be a finite number > 0, got '1e-4'"),
    (lambda p: p["loss"]["lambdas"].pop("awing"), r"loss.lambdas misses \['awing'\]"),
    (lambda p: p["loss"]["lambdas"].update(awing=float("inf")), r"lambdas.awing must be a finite number >= 0, got inf"),
    (lambda p: p.update(trainer=3), r"'trainer' must be a mapping, got 3"),
    (lambda p: p.update(study=3), r"'study' must be a mapping, got 3"),
    (lambda p: p.update(launcher=[1]), r"'launcher' must be a mapping, got \[1\]"),
])
def test_bad_run_params_file_is_refused_naming_it(tmp_path, edit, match):
    """What ``train --params`` reads: refused at load, not later inside the loss or the optimiser."""
    path = _run_params_file(tmp_path, edit)
    with pytest.raises(ParamsError, match=match) as e:
        config.load_params(path)
    assert str(e.value).startswith(f"{path}: ")


def test_a_complete_run_params_file_loads(tmp_path):
    params = config.run_params("smoke")
    assert config.load_params(_run_params_file(tmp_path)) == params


def test_bad_preset_value_is_refused_naming_the_files(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("data: {root: x, crop_size: 50}\n")
    with pytest.raises(ParamsError, match=r"mine.yaml \+ .*baseline.yaml: data.crop_size must be"):
        config.run_params(preset, "baseline")


def test_fingerprint_ignores_where_outputs_live_but_not_which_data(monkeypatch, tmp_path):
    params = config.run_params("smoke")
    before = config.training_fingerprint(params)
    assert config.training_fingerprint(deep_merge(params, {"description": "reworded"})) == before
    moved = tmp_path / "elsewhere" / "outputs"
    monkeypatch.setattr(config, "OUTPUTS_DIR", moved)
    params_moved = config.run_params("smoke")
    assert params_moved["data"]["root"] == str(moved / "data" / "smoke")
    assert config.training_fingerprint(params_moved) == before
    other = deep_merge(params_moved, {"data": {"root": str(tmp_path / "real_data")}})
    assert config.training_fingerprint(other) != before


def test_data_root_has_one_rule_for_every_reader(monkeypatch, tmp_path):
    """A relative data.root is under outputs/, whatever the working directory holds; the study's
    planned params and a params file read by training or evaluation resolve it alike."""
    monkeypatch.setattr(config, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "smoke").mkdir(parents=True)  # a same-named folder in the working directory
    assert config.data_root("data/smoke") == tmp_path / "outputs" / "data" / "smoke"
    assert config.run_params("smoke")["data"]["root"] == str(tmp_path / "outputs" / "data" / "smoke")
    assert config.data_root("/abs/olute") == config.Path("/abs/olute")
    assert config.data_root("~/d") == config.Path.home() / "d"
    with pytest.raises(ValueError, match="data.root is not set"):
        config.data_root(None)


def test_fingerprint_survives_training_rewriting_params_yaml(tmp_path):
    """Training rewrites a run's params.yaml with every default filled in and the runner's device
    settings: the run still has the fingerprint it was planned with."""
    params = config.run_params("smoke", "no_2d", seed=2)
    rewritten = tmp_path / "params.yaml"
    config.save_params(Settings.parse(devices.on_device(params, "cpu", num_threads=3)).to_dict(), rewritten)
    assert config.training_fingerprint(config.load_params(rewritten)) == config.training_fingerprint(params)
    explicit = deep_merge(params, {"optim": {"schedule": "plateau"}, "trainer": {"max_steps": -1}})
    assert config.training_fingerprint(explicit) == config.training_fingerprint(params)  # the defaults
    assert config.training_fingerprint(deep_merge(params, {"trainer": {"max_steps": 7}})) != \
        config.training_fingerprint(params)


def test_paper_preset_is_the_reference_recipe():
    """The official configuration's schedule, stopping and crop (docs/ARCHITECTURE.md, differences)."""
    p = Settings.parse(config.run_params("paper")).to_dict()
    assert p["optim"]["schedule"] == "plateau"
    assert (p["optim"]["plateau_patience"], p["optim"]["plateau_factor"], p["optim"]["min_lr"]) == (8, 0.5, 1e-6)
    assert (p["trainer"]["early_stopping_patience"], p["trainer"]["min_epochs"], p["trainer"]["max_epochs"]) == \
        (10, 100, 500)
    assert (p["data"]["crop_size"], p["data"]["batch_size"], p["optim"]["lr"]) == (256, 64, 1e-4)
    assert p["data"]["clip_bbox"] is True and p["data"]["augment"] is False
    assert (p["model"]["bifpn_levels"], p["model"]["bifpn_repeats"], p["model"]["bifpn_bn_eps"]) == (5, 2, 4e-5)


# Fingerprints computed on the code before settings were typed (commit ce3044a), one line per preset
# and ablation: seeds 1, 2, 3. The runs of existing studies stay finished only while these hold.
PINNED_FINGERPRINTS = """
smoke baseline f86b36c705de 7500d945d21e 2740aeb8daeb
smoke l3d50_proj0.05 f86b36c705de 7500d945d21e 2740aeb8daeb
smoke l3d50_proj0.5 000996511375 6b1e1ff8330e e8896f17799d
smoke l3d5_proj0.05 42f390bac25a d6c0fb7c40cc e599edbc11a5
smoke no_2d deb566ee183f cb02620ce69a 9b53c09a8b72
smoke no_l3d 10bb5aec0918 552cf9ddbfce 0c107b08d695
smoke no_lproj ec4786da3808 22b3691e9448 2b5295368371
cpu baseline 6ffb94a95a95 4b36573a2ba0 d04d1bb32ed8
cpu l3d50_proj0.05 6ffb94a95a95 4b36573a2ba0 d04d1bb32ed8
cpu l3d50_proj0.5 b7277824fe6b 0e5e931f5055 7f17332dadbb
cpu l3d5_proj0.05 bb7b87686882 4a6e684af800 fbbd5e41df22
cpu no_2d c8335017a374 211909bfe3ad 2fe4d088716a
cpu no_l3d cd10bdda7189 ba6670e57f88 4b4a9538bb83
cpu no_lproj cfad4b4da702 8fff8f5db966 3b4b87dc3a74
paper baseline f121977bd828 684a04a43937 4c85608596dc
paper l3d50_proj0.05 f121977bd828 684a04a43937 4c85608596dc
paper l3d50_proj0.5 67f97731d4b0 7365fb908cbe 60d66bcda3c7
paper l3d5_proj0.05 3d36e3da58fe 3e6b7076d27b d90e479173b5
paper no_2d 9fe24b39f8c9 277fc4b7b614 413aa43c46fa
paper no_l3d 9fd6926f8132 0c5a1879430f 01038e0805cd
paper no_lproj ff447d334122 3397b768d926 6003d3a8ea69
"""
FINGERPRINTS = {(preset, ablation): tuple(seeds) for preset, ablation, *seeds in
                (line.split() for line in PINNED_FINGERPRINTS.strip().splitlines())}


@pytest.mark.parametrize("preset", ("smoke", "cpu", "paper"))
def test_every_existing_run_keeps_its_fingerprint(preset):
    """Each preset × ablation × seed hashes as it did before settings were typed, also with every
    default filled in (a run's params.yaml rewritten by training) and placed on a device: the runs of
    existing studies stay finished."""
    assert sorted(a for p, a in FINGERPRINTS if p == preset) == config.available("ablations")
    for ablation in config.available("ablations"):
        for seed, fingerprint in enumerate(FINGERPRINTS[preset, ablation], 1):
            params = config.run_params(preset, ablation, seed)
            assert config.training_fingerprint(params) == fingerprint, (preset, ablation, seed)
            complete = Settings.parse(devices.on_device(params, "cpu", num_threads=1)).to_dict()
            assert config.training_fingerprint(complete) == fingerprint, (preset, ablation, seed)


def test_the_schema_version_counts_only_when_it_is_not_1(monkeypatch):
    params = config.run_params("smoke")
    assert config.SCHEMA_VERSION == 1 and config.training_fingerprint(params) == FINGERPRINTS["smoke", "baseline"][0]
    monkeypatch.setattr(config, "SCHEMA_VERSION", 2)
    assert config.training_fingerprint(params) != FINGERPRINTS["smoke", "baseline"][0]


def test_later_keys_count_only_when_set_otherwise():
    """Settings added with defaults that reproduce the earlier behaviour (LATER_KEYS) leave the
    fingerprints of existing studies as they were (the pins above), unless a run sets them otherwise."""
    params = config.run_params("cpu")
    now = config.training_fingerprint(params)
    for section, key, value in [("model", "bifpn_levels", 5), ("data", "clip_bbox", True), ("trainer", "min_epochs", 3),
                                ("data", "holdout_fraction", 0.2), ("trainer", "compile", True)]:
        assert key in config.LATER_KEYS[section]
        assert config.training_fingerprint(deep_merge(params, {section: {key: value}})) != now


def test_the_data_recipe_counts_in_the_fingerprint_but_leaves_earlier_studies_finished():
    """A generated data set counts by its recipe (data.synthetic); the recipes the presets had when they
    were named in code count as they did then (not at all), so studies begun then keep their runs."""
    for name in ("smoke", "cpu", "paper"):
        params = config.run_params(name)
        recipe = Settings.parse(params).data.synthetic
        assert config.recipe_digest(recipe) in config.FORMER_RECIPES
        assert config.training_fingerprint(params) == \
            config.training_fingerprint(deep_merge(params, {"data": {"synthetic": None}}))
    params = config.run_params("cpu")
    now = config.training_fingerprint(params)
    for change in ({"splits": {"train": 1000}}, {"seed": 1}, {"sampling": {"yaw_max": 60.0}},
                   {"sampling": {"degrade": {"jpeg": 0.0}}}, {"image_sizes": [[224, 224]]}):
        assert config.training_fingerprint(deep_merge(params, {"data": {"synthetic": change}})) != now, change


@pytest.mark.parametrize("text, match", [
    ("study: {make_data: cpu}\n", r"study.make_data and study.data_seed are now data.synthetic"),
    ("data: {synthetic: {splits: {train: 2}, image_sizes: [[64]]}}\n", r"data.synthetic.image_sizes must be"),
    ("data: {synthetic: {splits: {train: 2}, image_sizes: [[64, 64]], sampling: {yaw: 3}}}\n", r"unknown key"),
])
def test_a_bad_data_recipe_is_refused_naming_the_file(tmp_path, text, match):
    preset = tmp_path / "mine.yaml"
    preset.write_text(text)
    with pytest.raises(ParamsError, match=f"mine.yaml.*{match}"):
        config.run_params(preset)


def test_a_preset_with_an_eval_section_is_refused_naming_it(tmp_path):
    """Nothing reads an ``eval`` section (the data's split protocol picks the split, data.batch_size
    the evaluation's batch): a preset setting one is refused, not silently ignored."""
    preset = tmp_path / "mine.yaml"
    preset.write_text("data: {root: x}\neval: {refine_iters: 3}\n")
    with pytest.raises(ParamsError) as e:
        config.run_params(preset, "baseline")
    assert str(e.value).startswith(f"{preset}: unknown section(s) ['eval']") and "\n" not in str(e.value)


@pytest.mark.parametrize("value, match", [
    ("4e-5", r"model.bifpn_bn_eps must be a finite number > 0 \(write 4.0e-5"),
    (0, r"model.bifpn_bn_eps must be a finite number > 0"),
])
def test_bad_bifpn_value_in_a_preset_is_refused_naming_the_files(tmp_path, value, match):
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"data: {{root: x}}\nmodel: {{bifpn_bn_eps: {value}}}\n")
    with pytest.raises(ParamsError, match=r"mine.yaml \+ .*baseline.yaml: " + match):
        config.run_params(preset, "baseline")


def test_the_shape_protocol_is_an_evaluation_setting_outside_the_fingerprint(tmp_path):
    """study.shape_protocol (evaluation only) changes no run's training fingerprint, defaults to what
    every study measured before it (landmarks), and a bad value is refused naming the file."""
    from dad3dlib.metrics import SHAPE_PROTOCOLS

    for name in ("smoke", "cpu", "paper"):
        params = config.run_params(name)
        assert Settings.parse(params).study.shape_protocol == "landmarks"
        for protocol in SHAPE_PROTOCOLS:
            changed = deep_merge(params, {"study": {"shape_protocol": protocol}})
            assert config.training_fingerprint(changed) == config.training_fingerprint(params)
            assert Settings.parse(changed).study.shape_protocol == protocol
    preset = tmp_path / "mine.yaml"
    preset.write_text("data: {root: x}\nstudy: {shape_protocol: icp}\n")
    with pytest.raises(ParamsError) as e:
        config.run_params(preset)
    assert str(e.value) == f"{preset} + {config.resolve('ablations', 'baseline')}: study.shape_protocol must be " \
                           "one of landmarks, now, got 'icp'"


# --------------------------------------------------------------------------------------------
# Primary hypotheses: stated in the ablation files, validated with the params, in no fingerprint
# --------------------------------------------------------------------------------------------
def test_every_ablation_states_its_primary_hypothesis():
    """Each ablation of the plan names the metrics it should change and the direction; the baseline,
    and its alias (the same run), state none."""
    from dad3dlib.metrics import metric_names

    for name in config.available("ablations"):
        stated = config.stated_hypothesis(name)
        assert stated == config.run_params("smoke", name)["hypothesis"]
        if name in ("baseline", "l3d50_proj0.05"):
            assert stated == {}, name
        else:
            assert stated and set(stated) <= set(metric_names("study")), name
            assert set(stated.values()) <= {"worse", "better"}, name
    assert config.stated_hypothesis("no_l3d") == {"mean_mm": "worse"}
    assert config.stated_hypothesis("no_lproj") == {"angle_error_deg": "worse"}
    assert config.stated_hypothesis("no_2d") == {"nme_reprojection": "worse"}


def test_a_bad_hypothesis_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("hypothesis: {mean_mm: up}\nloss: {lambdas: {l3d: 0, l1: 100, lproj: 0.05, awing: 1}}\n")
    for read in (lambda: config.run_params("smoke", bad), lambda: config.stated_hypothesis(bad)):
        with pytest.raises(ParamsError, match=r"mine.yaml: hypothesis.mean_mm must be worse or better, got 'up'") as e:
            read()
        assert "\n" not in str(e.value)


def test_a_preset_cannot_state_a_hypothesis(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("hypothesis: {mean_mm: worse}\n")
    with pytest.raises(ParamsError, match="mine.yaml: hypothesis belongs in an ablation file"):
        config.run_params(preset)


def test_hypotheses_leave_every_training_fingerprint_as_it_was(tmp_path):
    """A hypothesis is what the study expects, not what a run trains: stating, changing or removing
    it leaves the fingerprint (finished studies stay finished), also through a run's params.yaml."""
    for preset in config.available("presets"):
        for name in config.available("ablations"):
            params = config.run_params(preset, name)
            now = config.training_fingerprint(params)
            without = {k: v for k, v in params.items() if k != "hypothesis"}
            assert config.training_fingerprint(without) == now, (preset, name)
            assert config.training_fingerprint({**params, "hypothesis": {"z5_accuracy": "better"}}) == now
    params = config.run_params("cpu", "no_l3d")
    config.save_params(params, tmp_path / "params.yaml")
    loaded = config.load_params(tmp_path / "params.yaml")
    assert loaded["hypothesis"] == {"mean_mm": "worse"}
    assert config.training_fingerprint(loaded) == config.training_fingerprint(params)
    (tmp_path / "bad.yaml").write_text((tmp_path / "params.yaml").read_text().replace("mean_mm: worse", "mean_mm: up"))
    with pytest.raises(ParamsError, match="bad.yaml: hypothesis.mean_mm must be"):
        config.load_params(tmp_path / "bad.yaml")
