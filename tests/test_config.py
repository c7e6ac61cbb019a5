from datetime import date

import pytest

from flows.config import PipelineConfig, build_config
from tasks.errors import ConfigError


def test_defaults_and_presets():
    cfg = PipelineConfig(input="/d/weatherAUS.csv").resolved()
    data = cfg.data
    assert data.dataset == "weatheraus" and cfg.model_name == "weatheraus-autoencoder"
    assert data.key_columns == ["Date", "Location"] and data.label == "RainTomorrow"
    assert data.run_date == date.today()
    other = PipelineConfig(input="/d/sales.csv").resolved()
    assert other.data.key_columns is None and other.data.label is None


def test_config_file_yaml_and_toml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("input: a.csv\nlatent_dim: 4\nkind: vae\n")
    cfg = build_config(str(y), {"latent_dim": 3})
    assert (cfg.model.latent_dim, cfg.model.kind) == (3, "vae")
    t = tmp_path / "c.toml"
    t.write_text('input = "a.csv"\nhidden = [16, 8]\n')
    assert build_config(str(t), {}).model.hidden == (16, 8)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("input: a.csv\nlatnet_dim: 4\n", "latnet_dim: unknown field"),
        ("input: a.csv\nlatent_dim: many\n", "latent_dim"),
        ("input: a.csv\ncontamination: 0.9\n", "contamination"),
        ("input: a.csv\nkind: gan\n", "kind"),
        ("- a\n- b\n", "expected a mapping"),
        ("input: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_file_one_line(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        build_config(str(f), {})
    assert "\n" not in str(exc.value) and str(f) in str(exc.value)


def test_dataset_name_escape_refused():
    with pytest.raises(ConfigError):
        build_config(None, {"input": "a.csv", "dataset": "../../etc"})


def test_config_hash_stable_and_sensitive():
    a = PipelineConfig(input="x.csv")
    assert a.config_hash() == PipelineConfig(input="x.csv").config_hash()
    assert a.config_hash() != PipelineConfig(input="x.csv", latent_dim=4).config_hash()


def test_sectioned_file_flags_and_flat_file_build_the_same_config(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("input: a.csv\nlatent_dim: 4\nrunner: threads\nretrain: true\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "data: {input: a.csv}\nmodel: {latent_dim: 4}\n"
        "execution: {runner: threads}\npolicy: {retrain: true}\n"
    )
    a, b = build_config(str(flat), {}), build_config(str(nested), {})
    assert a == b and a.config_hash() == b.config_hash()
    assert (b.model.latent_dim, b.execution.runner, b.policy.retrain) == (
        4,
        "threads",
        True,
    )
    # A flag (flat) overrides the file's field in its section, keeping the rest.
    c = build_config(str(nested), {"latent_dim": 2, "epochs": None})
    assert (c.model.latent_dim, c.model.epochs, c.data.input) == (2, 80, "a.csv")


def test_field_given_flat_and_in_its_section_differently_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("input: a.csv\nlatent_dim: 4\nmodel: {latent_dim: 3}\n")
    with pytest.raises(ConfigError, match="latent_dim is given twice") as exc:
        build_config(str(f), {})
    assert "\n" not in str(exc.value) and str(f) in str(exc.value)
    # Errors inside a section name the field as users write it.
    f.write_text("model: {latent_dim: 0}\ndata: {input: a.csv}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: latent_dim: Input should be"):
        build_config(str(f), {})


def test_promote_flag_and_anomaly_cut_leave_existing_hashes_alone():
    from flows.cli import _overrides, _parser

    args = _parser().parse_args(["run", "--input", "x.csv", "--promote"])
    base = PipelineConfig(data={"input": "x.csv"})
    cfg = build_config(None, _overrides(args))
    assert cfg.policy.promote is True
    # An operator's override changes no model and no output: same hash.
    assert cfg.config_hash() == base.config_hash()
    # An unset cut hashes as before it existed; a set one changes the outputs.
    cut = build_config(None, {"input": "x.csv", "anomaly_score_threshold": 0.99})
    assert cut.model.anomaly_score_threshold == 0.99
    assert cut.config_hash() != base.config_hash()
    with pytest.raises(ConfigError, match="anomaly_score_threshold"):
        build_config(None, {"input": "x.csv", "anomaly_score_threshold": 1.5})
