"""Partitioned work without a cluster: config and CLI rules, unit planning, and
scoring cut into units giving exactly the single-unit output.

The runs on real Dask clusters are in ``tests/test_dask.py``.
"""

from __future__ import annotations

import json
import socket
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import _overrides, _parser, main
from flows.config import PipelineConfig, build_config
from flows.runners import ClusterError, RunnerScope, check_scheduler
from tasks.errors import ConfigError
from tasks.score import Provenance

RUN = date(2024, 1, 1)
PRESET = {"keys": ["Date", "Location"], "label": "RainTomorrow"}
TINY_MODEL = {
    "latent_dim": 3,
    "hidden": (16,),
    "epochs": 2,
    "batch_size": 256,
    "device": "cpu",
    "random_state": 0,
}
META = Provenance("m", 1, "r", "c")


# ------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dask_address": "tcp://127.0.0.1:8786"}, "dask_address applies only with"),
        ({"dask_workers": 2, "runner": "threads"}, "runner is 'threads'"),
        (
            {"runner": "dask", "dask_workers": 2, "dask_address": "tcp://h:1"},
            "not both",
        ),
        ({"runner": "dask", "dask_workers": 0}, "dask_workers"),
        ({"runner": "spark"}, "runner"),
        ({"data_dir": "s3://bucket/lf"}, "object-store URLs are not supported"),
    ],
)
def test_runner_options_are_validated_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as exc:
        build_config(None, {"input": "a.csv", **overrides})
    assert "\n" not in str(exc.value)
    assert "Value error" not in str(exc.value)


def test_runner_choice_does_not_change_the_model_identity():
    base = PipelineConfig(input="x.csv", data_dir="d")
    for extra in (
        {"runner": "threads"},
        {"runner": "dask", "dask_workers": 2},
        {"runner": "dask", "dask_address": "tcp://scheduler:8786"},
    ):
        other = PipelineConfig(input="x.csv", data_dir="d", **extra)
        assert other.config_hash() == base.config_hash()
        assert other.model_params() == base.model_params()
        assert other.estimator_params() == base.estimator_params()
    # The default config's hash, recorded: adding a run-only field must not
    # change it (champions and scored dates keep their identity). It changes
    # only when a default that shapes the model does (lr 1e-2, cosine schedule).
    assert base.config_hash() == "1ee613caf08cbf12"


def test_cli_flags_map_to_config_fields():
    args = _parser().parse_args(
        ["run", "--input", "x.csv", "--runner", "dask", "--dask-workers", "3"]
    )
    cfg = build_config(None, _overrides(args))
    run = cfg.execution
    assert (run.runner, run.dask_workers, run.dask_address) == ("dask", 3, None)
    args = _parser().parse_args(
        ["run", "--input", "x.csv", "--runner", "dask", "--dask-address", "h:8786"]
    )
    assert build_config(None, _overrides(args)).execution.dask_address == "h:8786"


def test_cli_refuses_dask_address_without_runner_dask(capsys):
    rc = main(["run", "--input", "x.csv", "--dask-address", "tcp://127.0.0.1:1"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "latentflow: error: invalid configuration in command-line options:"
        " dask_address applies only with runner 'dask' (runner is 'sequential')"
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_line():
    port = _closed_port()
    with pytest.raises(ClusterError) as exc:
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout=2)
    assert str(exc.value).startswith(
        f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}: "
    )
    with pytest.raises(ClusterError, match="expected tcp://HOST:PORT"):
        check_scheduler("tcp://127.0.0.1")


def test_unreachable_scheduler_through_the_cli(prefect_harness, tmp_path, capsys):
    port = _closed_port()
    # A valid input: the input is checked first, so only the scheduler is wrong.
    src = tmp_path / "in.csv"
    src.write_text("a,b\n1,2\n3,4\n")
    rc = main(
        [
            "run",
            "--input",
            str(src),
            "--data-dir",
            str(tmp_path / "lf"),
            "--runner",
            "dask",
            "--dask-address",
            f"tcp://127.0.0.1:{port}",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    line = (
        f"latentflow: error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"
    )
    assert line in err and "Traceback" not in err
    # Checked before anything else: no lock taken, nothing written.
    assert not (tmp_path / "lf").exists()


def test_sequential_and_threads_scopes_start_nothing():
    assert RunnerScope("sequential", None, None).task_runner() is None
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(
        RunnerScope("threads", None, None).task_runner(), ThreadPoolTaskRunner
    )


# ------------------------------------------------------------------- planning


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("units")


@pytest.fixture(scope="module")
def ingested(work: Path) -> Path:
    """3,000 rows in two files, each of several row groups of ~330 rows."""
    from tasks.ingest import ingest
    from tasks.synthetic import write_weatheraus_like_csv

    csv = write_weatheraus_like_csv(work / "w.csv", 3000, seed=2)
    res = ingest(csv, work / "one", "weatheraus", RUN, block_size=32 << 10, **PRESET)
    # A second file: the same partition split in two by row groups.
    src = Path(res.ingested_dir)
    out = work / "two"
    out.mkdir()
    with pq.ParquetFile(next(src.glob("*.parquet"))) as pf:
        half = pf.num_row_groups // 2
        for name, groups in (
            ("part-00000.parquet", range(half)),
            ("part-00001.parquet", range(half, pf.num_row_groups)),
        ):
            with pq.ParquetWriter(out / name, pf.schema_arrow) as w:
                for g in groups:
                    w.write_table(pf.read_row_group(g))
    return out


@pytest.fixture(scope="module")
def bundle(work: Path, ingested: Path) -> Path:
    from tasks.train import train_model

    meta = pq.read_schema(next(ingested.glob("*.parquet"))).metadata
    schema = json.loads(meta[b"latentflow.schema"])
    out = work / "bundle"
    train_model(
        ingested, schema, out, dataset="weatheraus", estimator_params=TINY_MODEL
    )
    return out


def test_units_cover_every_row_group_once(ingested: Path):
    from tasks.partitions import partition_files, plan_units, single_unit

    files = partition_files(ingested)
    groups = {str(f): pq.read_metadata(f).num_row_groups for f in files}
    total = sum(pq.read_metadata(f).num_rows for f in files)
    for unit_rows in (1, 700, 1500, 10**9):
        units = plan_units(files, unit_rows)
        assert [u.index for u in units] == list(range(len(units)))
        covered = [
            (p.file, g) for u in units for p in u.pieces for g in range(p.start, p.stop)
        ]
        assert covered == [(f, g) for f, n in groups.items() for g in range(n)]
        assert sum(u.rows for u in units) == total
        # A unit never spans files, and only a file's last unit is short.
        for u in units:
            (piece,) = u.pieces
            assert u.rows >= unit_rows or piece.stop == groups[piece.file]
    assert len(plan_units(files, 10**9)) == len(files)
    (one,) = single_unit(files)
    assert one.rows == total and len(one.pieces) == len(files)


def test_unit_size_spreads_small_partitions():
    from tasks.partitions import DEFAULT_UNIT_ROWS, MIN_UNITS, unit_size

    assert unit_size(10_000_000) == DEFAULT_UNIT_ROWS
    assert unit_size(200_000) == 200_000 // MIN_UNITS
    assert unit_size(3) == 1 and unit_size(0) == 1


def test_units_score_exactly_like_one_unit(work: Path, ingested: Path, bundle: Path):
    """Cut into many units and scored one by one, in any order: the same rows,
    the same values, bit for bit, and the same summary."""
    from tasks.partitions import open_staged, partition_files, plan_units
    from tasks.score import (
        commit_scores,
        prepare_scoring,
        score_partition,
        score_unit,
    )

    seq = score_partition(ingested, bundle, work / "seq", "weatheraus", RUN, META)
    layout = prepare_scoring(ingested, bundle, "weatheraus", RUN, META)
    units = plan_units(partition_files(ingested), 700)
    assert len(units) >= 4
    staged = open_staged(work / "par", "latent", "weatheraus", RUN)
    # A killed attempt's leftover must not be committed.
    (staged.path / ".part-00001.parquet.tmp-0123456789ab").write_bytes(b"partial")
    results = [score_unit(u, layout, bundle, staged.path) for u in reversed(units)]
    par = commit_scores(staged, units, results)

    a = pq.read_table(seq.output_dir).sort_by("_row_id")
    b = pq.read_table(par.output_dir).sort_by("_row_id")
    assert a.equals(b)
    assert b["_row_id"].to_numpy().tolist() == sorted(set(a["_row_id"].to_pylist()))
    names = sorted(p.name for p in Path(par.output_dir).iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(len(units))]
    assert (par.rows_scored, par.anomalies) == (seq.rows_scored, seq.anomalies)
    assert par.top_anomalies == seq.top_anomalies
    assert par.recon_error_mean == pytest.approx(seq.recon_error_mean, rel=1e-9)
    meta = pq.read_schema(next(Path(par.output_dir).glob("*.parquet"))).metadata
    assert meta[b"latentflow.model_version"] == b"1"


def test_dictionary_reads_change_nothing(work: Path, ingested: Path, bundle: Path):
    """Scoring reads the model's categoricals dictionary-encoded; the output
    is the one plain string reads give, bit for bit."""
    from dataclasses import replace

    from tasks.partitions import partition_files, single_unit
    from tasks.score import prepare_scoring, score_unit

    layout = prepare_scoring(ingested, bundle, "weatheraus", RUN, META)
    # The wind directions and RainToday; the keys are copied as they are.
    assert "WindDir9am" in layout.dictionary_columns
    assert not set(layout.dictionary_columns) & set(layout.keys)
    (unit,) = single_unit(partition_files(ingested))
    tables = []
    for name, used in (
        ("dict", layout),
        ("plain", replace(layout, dictionary_columns=())),
    ):
        out = work / f"read-{name}"
        out.mkdir()
        result = score_unit(unit, used, bundle, out, batch_rows=500)
        tables.append(pq.read_table(out / result.file))
    assert tables[0].num_rows == 3000 and tables[0].equals(tables[1])


def test_commit_refuses_a_missing_unit(work: Path, ingested: Path, bundle: Path):
    from tasks.partitions import (
        discard_staged,
        open_staged,
        partition_files,
        plan_units,
    )
    from tasks.score import commit_scores, prepare_scoring, score_unit

    layout = prepare_scoring(ingested, bundle, "weatheraus", RUN, META)
    units = plan_units(partition_files(ingested), 1500)
    staged = open_staged(work / "missing", "latent", "weatheraus", RUN)
    try:
        results = [score_unit(u, layout, bundle, staged.path) for u in units]
        staged.file(units[-1].output_name).unlink()
        with pytest.raises(RuntimeError, match="rows written"):
            commit_scores(staged, units, results)
        with pytest.raises(RuntimeError, match="planned"):
            commit_scores(staged, units, results[:-1])
    finally:
        discard_staged(staged)
    assert not staged.path.exists()
    assert not (work / "missing" / "latent").exists()


def test_model_is_loaded_once_per_process(bundle: Path, tmp_path: Path):
    import shutil

    from models.integrity import write_manifest
    from tasks.score import load_model

    assert load_model(bundle) is load_model(bundle)
    # A changed bundle at the same path is a different model.
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    first = load_model(copy)
    info = json.loads((copy / "bundle.json").read_text())
    info["trained_at"] = "changed"
    (copy / "bundle.json").write_text(json.dumps(info))
    write_manifest(copy)  # a re-save writes the manifest last
    assert load_model(copy) is not first


# ----------------------------------------------------------- ingest by file


def _split_csv(work: Path, rows: int, files: int, name: str = "src") -> Path:
    """One generated CSV cut into ``files`` CSVs with disjoint keys."""
    from tasks.synthetic import write_weatheraus_like_csv

    whole = write_weatheraus_like_csv(work / f"{name}.csv", rows, seed=3)
    header, *body = whole.read_text().splitlines(keepends=True)
    src = work / name
    src.mkdir()
    per = rows // files
    for i in range(files):
        chunk = body[i * per : (i + 1) * per]
        (src / f"f{i}.csv").write_text(header + "".join(chunk))
    return src


def _ingest_by_file(src: Path, data_dir: Path, **kw):
    """What the latentflow-ingest subflow does, without Prefect: every file,
    then the files that must be typed with the first file's schema, then the
    commit (None: the caller falls back to the single-process ingest)."""
    from flows.config import PRESETS
    from tasks.ingest.parts import (
        commit_ingest,
        ingest_file,
        list_sources,
        needs_typing,
        reference_part,
    )
    from tasks.partitions import remove_scratch, scratch_dir

    scratch = scratch_dir(data_dir, "ingest-parts", "weatheraus", RUN)
    opts = {**PRESET, "rules": PRESETS["weatheraus"]["rules"]}
    try:
        parts = [
            ingest_file(i, f, scratch, "weatheraus", RUN, speculative=True, **opts)
            for i, f in enumerate(list_sources(str(src)))
        ]
        ref = reference_part(parts)
        for p in needs_typing(parts, ref):
            parts[p.index] = ingest_file(
                p.index,
                p.path,
                scratch,
                "weatheraus",
                RUN,
                expected_schema=ref.result.schema,
                **opts,
            )
        return commit_ingest(
            parts,
            data_dir,
            "weatheraus",
            RUN,
            source=str(src),
            max_reject_fraction=kw.get("max_reject_fraction", 0.05),
        )
    finally:
        remove_scratch(scratch)


def _single(src: Path, data_dir: Path, **kw):
    from flows.config import PRESETS
    from tasks.ingest import ingest

    return ingest(
        str(src),
        data_dir,
        "weatheraus",
        RUN,
        rules=PRESETS["weatheraus"]["rules"],
        **PRESET,
        **kw,
    )


def test_ingest_by_file_equals_one_process(tmp_path: Path):
    src = _split_csv(tmp_path, 900, 3)
    # A bad row in the second file: rejected the same way by both paths.
    f1 = src / "f1.csv"
    lines = f1.read_text().splitlines(keepends=True)
    cells = lines[5].split(",")
    cells[2] = "abc"  # MinTemp
    lines[5] = ",".join(cells)
    f1.write_text("".join(lines))
    one = _single(src, tmp_path / "one")
    many = _ingest_by_file(src, tmp_path / "many")
    assert many is not None
    for name in ("rows_in", "rows_accepted", "rows_rejected", "reject_reasons"):
        assert getattr(many, name) == getattr(one, name), name
    assert many.schema == one.schema and many.source_files == one.source_files
    assert many.rows_rejected == 1
    a = pq.read_table(one.ingested_dir).sort_by("_row_id")
    b = pq.read_table(many.ingested_dir).sort_by("_row_id")
    assert a.equals(b)
    ra, rb = pq.read_table(one.rejected_dir), pq.read_table(many.rejected_dir)
    assert ra.drop_columns([]).equals(rb)
    names = sorted(p.name for p in Path(many.ingested_dir).iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # Nothing left in .staging.
    assert not list((tmp_path / "many" / ".staging").iterdir())


def test_ingest_by_file_checks_span_files(tmp_path: Path):
    from tasks.errors import InputError

    # A key in two files: the first row must win, the second be rejected with
    # its raw text: handed back to the single-process ingest.
    src = _split_csv(tmp_path, 600, 2, "dup")
    first = (src / "f0.csv").read_text().splitlines(keepends=True)
    with open(src / "f1.csv", "a") as fh:
        fh.write(first[1])
    assert _ingest_by_file(src, tmp_path / "dup-out") is None
    assert not (tmp_path / "dup-out" / "ingested").exists()

    # 12% rejected in one file, 4% overall: accepted, as one process would.
    src = _split_csv(tmp_path, 900, 3, "rej")
    f2 = src / "f2.csv"
    header, *body = f2.read_text().splitlines(keepends=True)
    for i in range(36):
        cells = body[i].split(",")
        cells[2] = "junk"
        body[i] = ",".join(cells)
    f2.write_text(header + "".join(body))
    ok = _ingest_by_file(src, tmp_path / "rej-out")
    assert (
        ok is not None
        and ok.rows_rejected == 36 == _single(src, tmp_path / "rej-one").rows_rejected
    )
    with pytest.raises(InputError, match=r"36 of 900 rows rejected \(4.0%\)"):
        _ingest_by_file(src, tmp_path / "rej-strict", max_reject_fraction=0.03)
    assert not (tmp_path / "rej-strict" / "ingested").exists()

    # A file whose header differs, and one with no rows (a warning).
    src = _split_csv(tmp_path, 600, 2, "hdr")
    (src / "f2.csv").write_text((src / "f0.csv").read_text().splitlines()[0] + "\n")
    res = _ingest_by_file(src, tmp_path / "hdr-out")
    assert res is not None and f"{src / 'f2.csv'} has a header but no rows" in (
        res.warnings
    )
    text = (src / "f1.csv").read_text().replace("Sunshine", "Sun", 1)
    (src / "f1.csv").write_text(text)
    with pytest.raises(InputError, match="header differs from"):
        _ingest_by_file(src, tmp_path / "hdr-bad")


# ------------------------------------------------------- scoring on threads


def test_scoring_threads_change_nothing(work: Path, ingested: Path, bundle: Path):
    """Batches scored on three threads give the one-thread output bit for bit:
    the same rows in the same order, row groups and summary."""
    from tasks.score import score_partition

    runs = {
        w: score_partition(
            ingested,
            bundle,
            work / f"threads-{w}",
            "weatheraus",
            RUN,
            META,
            batch_rows=128,
            workers=w,
        )
        for w in (1, 3)
    }
    one, three = (pq.read_table(runs[w].output_dir) for w in (1, 3))
    assert one.num_rows == 3000 and one.equals(three)
    groups = [
        [
            pq.read_metadata(f).row_group(g).num_rows
            for f in sorted(Path(runs[w].output_dir).glob("*.parquet"))
            for g in range(pq.read_metadata(f).num_row_groups)
        ]
        for w in (1, 3)
    ]
    assert groups[0] == groups[1] and len(groups[0]) > 10
    a, b = runs[1], runs[3]
    assert (a.rows_scored, a.anomalies, a.top_anomalies) == (
        b.rows_scored,
        b.anomalies,
        b.top_anomalies,
    )
    assert a.score_quantiles == b.score_quantiles


def test_scoring_threads_raise_the_first_error_and_stop():
    """A batch that fails raises in the caller, in order; the batches after it
    are not all scored (at most the ones already in flight)."""
    from tasks.score import _in_order

    seen: list[int] = []

    class Batch:
        def __init__(self, i: int) -> None:
            self.i, self.num_rows = i, 1

    def fn(batch: Batch) -> int:
        seen.append(batch.i)
        if batch.i == 3:
            raise OSError("disk gone")
        return batch.i

    got: list[int] = []
    with pytest.raises(OSError, match="disk gone"):
        for r in _in_order(fn, (Batch(i) for i in range(100)), 2):
            got.append(r)
    assert got == [0, 1, 2]
    assert max(seen) < 10


def test_score_workers_follow_the_device():
    from tasks.score import score_workers

    assert score_workers("cpu", cpus=16) == 1
    assert score_workers("cuda", cpus=16) == 4
    assert score_workers("cuda:1", cpus=2) == 2
    assert score_workers("cuda", cpus=1) == 1
