from datetime import date

import pytest

from flows.config import PipelineConfig, build_config
from tasks.errors import ConfigError


def test_defaults_and_presets():
    cfg = PipelineConfig(input="/d/weatherAUS.csv").resolved()
    assert cfg.dataset == "weatheraus" and cfg.model_name == "weatheraus-autoencoder"
    assert cfg.key_columns == ["Date", "Location"] and cfg.label == "RainTomorrow"
    assert cfg.run_date == date.today()
    other = PipelineConfig(input="/d/sales.csv").resolved()
    assert other.key_columns is None and other.label is None


def test_config_file_yaml_and_toml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("input: a.csv\nlatent_dim: 4\nkind: vae\n")
    cfg = build_config(str(y), {"latent_dim": 3})
    assert (cfg.latent_dim, cfg.kind) == (3, "vae")
    t = tmp_path / "c.toml"
    t.write_text('input = "a.csv"\nhidden = [16, 8]\n')
    assert build_config(str(t), {}).hidden == (16, 8)


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
