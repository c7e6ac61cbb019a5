from datetime import UTC, datetime, timedelta

from tasks.decide import ChampionInfo, decide, schema_difference

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def schema(**cols):
    return {
        "columns": [{"name": n, "kind": k, "role": "feature"} for n, k in cols.items()]
    }


def champ(age_days=1.0, **cols):
    return ChampionInfo(
        "ds-autoencoder", 3, "run", NOW - timedelta(days=age_days), "/m", schema(**cols)
    )


def test_no_champion_trains():
    assert decide(None, schema(a="numeric"), NOW, 7, False).reason == "no_champion"


def test_forced_retrain():
    d = decide(champ(a="numeric"), schema(a="numeric"), NOW, 7, True)
    assert (d.action, d.reason) == ("train", "forced")


def test_reuse_when_fits_and_young():
    d = decide(champ(a="numeric"), schema(a="numeric"), NOW, 7, False)
    assert d.action == "reuse" and "v3" in d.reason


def test_too_old_retrains():
    d = decide(champ(8, a="numeric"), schema(a="numeric"), NOW, 7, False)
    assert d.action == "train" and d.reason.startswith("too_old")


def test_schema_change_retrains_and_is_described():
    d = decide(champ(a="numeric"), schema(a="categorical", b="numeric"), NOW, 7, False)
    assert d.action == "train" and d.reason.startswith("schema_changed")
    assert "new b" in d.reason and "a numeric->categorical" in d.reason
    assert schema_difference(schema(a="numeric"), schema(a="numeric")) == ""


def test_changed_model_params_retrain_and_are_not_comparable():
    from tasks.decide import comparable

    c = champ(a="numeric")
    c = ChampionInfo(
        c.name,
        c.version,
        c.run_id,
        c.created_at,
        c.model_dir,
        c.input_schema,
        {"latent_dim": 8, "hidden": [64, 32]},
    )
    same = {"latent_dim": 8, "hidden": (64, 32)}
    assert decide(c, schema(a="numeric"), NOW, 7, False, params=same).action == "reuse"
    d = decide(c, schema(a="numeric"), NOW, 7, False, params={**same, "latent_dim": 3})
    assert d.action == "train" and d.reason == "params_changed: latent_dim 8->3"
    assert comparable(c, schema(a="numeric"), same)
    assert not comparable(c, schema(a="numeric"), {**same, "latent_dim": 3})
    assert not comparable(c, schema(a="categorical"), same)


def test_drift_is_measured_exactly_when_the_champion_could_be_reused():
    """The flow measures drift only when ``drift_matters``; that must be the
    case where a decision without drift would reuse, so one ``decide`` call
    (with the drift, when measured) gives the answer two calls gave before."""
    from tasks.decide import drift_matters

    params = {"latent_dim": 8}
    cases = [
        (None, schema(a="numeric"), False),
        (champ(a="numeric"), schema(a="numeric"), True),  # retrain
        (champ(a="numeric"), schema(a="numeric"), False),
        (champ(8, a="numeric"), schema(a="numeric"), False),  # too old
        (champ(a="numeric"), schema(a="categorical"), False),  # retyped
    ]
    for c, s, retrain in cases:
        reusable = decide(c, s, NOW, 7, retrain, params=None).action == "reuse"
        assert drift_matters(c, s, NOW, 7, retrain, None) == reusable
    changed = ChampionInfo(
        "ds-autoencoder", 3, "run", NOW, "/m", schema(a="numeric"), {"latent_dim": 4}
    )
    assert not drift_matters(changed, schema(a="numeric"), NOW, 7, False, params)


def test_champion_columns_missing_from_the_data_are_one_error():
    import pytest

    from tasks.decide import require_champion_columns
    from tasks.errors import SchemaError

    c = champ(a="numeric", b="numeric")
    require_champion_columns(c, schema(a="numeric", b="numeric", z="numeric"), False)
    require_champion_columns(c, schema(a="numeric"), True)  # retrain accepts it
    require_champion_columns(None, schema(a="numeric"), False)
    with pytest.raises(SchemaError, match=r"lacks column.*ds-autoencoder") as e:
        require_champion_columns(c, schema(a="numeric"), False)
    assert str(e.value).count("\n") == 0 and ": b;" in str(e.value)
